"""The correctness reference: EP estimates against the true gradient, per coupling.

The true gradient is that of L = sum_costs weight * C at the free fixed point s*(theta),
by implicit differentiation (recurrent backprop). Let F(s, theta) be one free colour sweep
in which each state's drive is dPhi/ds_j computed by *autograd through Phi* (independent
of the runtime's explicit adjoints; couplings without feedback, which drive their
destination only, add their value instead). At the fixed point s* = F(s*, theta), so

    dL/dtheta = v^T dF/dtheta,   v = dL/ds + (dF/ds)^T v,

and v is found by fixed-point iteration of vector-Jacobian products through one sweep
(converges because the sweep is a contraction around a stable fixed point). The EP
estimate comes from the runtime (explicit adjoints, runtime/learn.py) with both phases
settled to a tight tolerance. Compared per coupling (all weights of its chain) and per
bias: cosine, norm ratio |ep| / |true|, and sign agreement of the components.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from epc.compiler import ops as O
from epc.compiler.errors import EpcError

from .engine import Engine
from .learn import ep_gradient

# the adjoint iteration is declared divergent when its change has grown DIVERGED-fold over
# the smallest seen, after at least DIVERGE_AFTER iterations (a contraction's change can
# rise a little before it decays, not by orders of magnitude)
DIVERGED = 1e3
DIVERGE_AFTER = 20


def _autograd_sweep(eng: Engine, batch: dict, s: dict, P: dict, mode: str,
                    routing: dict | None = None) -> dict:
    """One free sweep whose drives are autograd gradients of Phi (differentiable)."""
    S = dict(s)
    groups = eng.classes if mode == "colour" else [eng.settled]
    for group in groups:
        # readout heads are not in Phi: their value is their couplings' plus bias, from the
        # states before this block (their sources are in other colour classes)
        vals = {**batch["clamped"], **S}
        heads = {r: eng.readout(r, vals, P, routing) for r in group if r in eng.is_readout}
        cls = [j for j in group if j not in eng.is_readout]
        if cls:
            # fresh aliases: the drive is the partial derivative of Phi w.r.t. the direct
            # occurrence of s_j, not the total one through states updated earlier this sweep
            leaves = {j: S[j].clone() for j in cls}
            S.update(leaves)
            # the two-way couplings' part of the drive by autograd of their energy terms;
            # one-way couplings (from inputs; all under --no-feedback) add their values
            phi = eng.phi(S, batch, P, routing=routing, two_way_only=True,
                          updating=set(cls))
            drives = torch.autograd.grad(phi, [leaves[j] for j in cls], create_graph=True,
                                         allow_unused=True)
            vals = {**batch["clamped"], **S}
            for j, u in zip(cls, drives):
                for l in eng.input_links[j] + eng.inbound[j]:
                    if not l.feedback:
                        y = eng.link_forward(l, vals[l.src], P, routing)[0]
                        u = y if u is None else u + y
                if u is None:
                    u = torch.zeros_like(leaves[j])
                S[j] = O.activate(eng.acts[j], u)
        S.update(heads)
    return S


def implicit_gradient(eng: Engine, batch: dict, s_star: dict, labels: torch.Tensor, *,
                      mode: str = "colour", iters: int = 2000, tol: float = 1e-9,
                      routing: dict | None = None,
                      drop_samples: bool = False) -> tuple[dict, dict]:
    """dL/dtheta at the free fixed point (L averaged over the batch). Returns (grads, info):
    info holds the adjoint iterations run, the last change of v (`adjoint_residual`) and
    `converged` (the change fell below `tol` times |v|; false when the iteration hit
    `iters` or diverged, i.e. its change grew DIVERGED-fold: s* is then no stable fixed
    point of the sweep and the gradient is not to be trusted).

    With `routing`, max-pools keep those selections (the linear piece the fixed point lies
    on); without, autograd differentiates max-pool at its argmax at s*.

    `drop_samples` (the trainer's use): the adjoint system is block-diagonal over the batch
    (samples do not interact in a sweep), so each sample's block converges or diverges on
    its own. A sample whose iteration diverges, or has not converged when `iters` run out,
    is left out: its rows of dL/ds and of v are zeroed (a zero block stays exactly zero)
    and the others go on. The gradient is then that of L averaged over the samples kept;
    info adds `kept` (a bool [n] tensor) and `dropped`, and `converged` means every kept
    sample converged and at least one was kept. Without it, one unstable sample makes the
    whole batch's iteration diverge.
    """
    names = list(eng.learnable)
    P = dict(eng.params)
    theta = {k: P[k].detach().clone().requires_grad_(True) for k in names}
    P.update(theta)
    n = batch["n"]
    with torch.enable_grad():
        s0 = {j: s_star[j].detach().clone().requires_grad_(True) for j in eng.settled}
        s1 = _autograd_sweep(eng, batch, s0, P, mode, routing)
        lsum = eng.loss(s0, batch, labels).mean()
        gl = torch.autograd.grad(lsum, [s0[j] for j in eng.settled], allow_unused=True)
        g = [torch.zeros_like(s0[j]) if x is None else x for j, x in zip(eng.settled, gl)]
        outs = [s1[j] for j in eng.settled]
        ins = [s0[j] for j in eng.settled]
        blocks = n if drop_samples else 1    # each sample, or the batch as one
        v, d, done, kept, it = _adjoint_iteration(outs, ins, g, blocks, iters, tol,
                                                  drop_samples, eng.device, eng.stop_sync)
        factor = 1.0
        if drop_samples:
            # samples still short of the tolerance when the budget ran out are left out too
            _zero_rows(v, kept & ~done)
            kept &= done
            nkept = int(kept.sum())
            converged = nkept > 0
            delta = float(torch.where(kept, d, 0.0).max()) if nkept else math.inf
            factor = n / nkept if nkept else 0.0
        else:
            converged, delta = bool(kept[0] and done[0]), float(d[0])
        grads = torch.autograd.grad(outs, [theta[k] for k in names], grad_outputs=v,
                                    allow_unused=True)
    out = {k: torch.zeros_like(theta[k]) if x is None else x.detach()
           for k, x in zip(names, grads)}
    if factor != 1.0:
        out = {k: x * factor for k, x in out.items()}
    info = {"iterations": it, "adjoint_residual": delta, "converged": converged}
    if drop_samples:
        info.update(kept=kept, dropped=n - nkept)
    return out, info


def _adjoint_iteration(outs: list, ins: list, g: list, blocks: int, iters: int, tol: float,
                       drop_samples: bool, device, stop_sync=None) -> tuple:
    """v <- g + J^T v (J: the sweep's Jacobian at s*, through autograd of `outs` w.r.t.
    `ins`) until every block has converged or left. Returns (v, per block its last change
    d, converged, still kept, iterations run).

    stop_sync (data parallel, `Engine.stop_sync`): the batch's iteration runs until every
    process's part of it has finished, as one process's does for the whole batch."""
    v = [x.clone() for x in g]
    # per block: its last change d of v, smallest change seen, converged, and still in the
    # gradient. The tests are made in float64, on the float32 maxima as the batch's always
    # were.
    d = torch.full((blocks,), math.inf, dtype=torch.float64, device=device)
    best = d.clone()
    done = torch.zeros(blocks, dtype=torch.bool, device=device)
    kept = torch.ones_like(done)
    it = 0
    for it in range(1, iters + 1):
        jv = torch.autograd.grad(outs, ins, grad_outputs=v, retain_graph=True,
                                 allow_unused=True)
        nv = [a + (torch.zeros_like(a) if b is None else b) for a, b in zip(g, jv)]
        d = _block_max([(a - b).abs() for a, b in zip(nv, v)], blocks)
        done = d <= tol * (_block_max([a.abs() for a in nv], blocks) + 1e-30)
        # growing a thousandfold from its smallest: the sweep expands around s*, the
        # iteration diverges (geometrically); stop that block instead of running out
        # the budget (a converged block is not divergent)
        bad = ~torch.isfinite(d)
        if it > DIVERGE_AFTER:
            bad |= d > DIVERGED * best
        bad &= kept & ~done
        best = torch.minimum(best, d)
        v = nv
        # one sync: any block to stop now, and has every block still in converged
        flags = torch.stack([bad.any(), (done | ~kept | bad).all()])
        if stop_sync is not None:
            # 'all finished' is 1 - the max over the processes of 'some block unfinished'
            unfinished = stop_sync((~flags[1]).to(torch.float32).reshape(1))
            flags[1] = unfinished[0] == 0
        any_bad, finished = flags.tolist()
        if any_bad:
            kept &= ~bad
            if drop_samples:      # the diverging samples leave; the rest go on
                _zero_rows(g, bad)
                _zero_rows(v, bad)
        if finished:
            break
    return v, d, done, kept, it


def _block_max(ts: list[torch.Tensor], blocks: int) -> torch.Tensor:
    """The largest entry of each block of rows over a list of [n, ...] tensors (blocks = n:
    per sample; 1: over the batch), as float64: [blocks]."""
    return torch.stack([t.reshape(blocks, -1).amax(1) for t in ts]).amax(0).double()


def _zero_rows(ts: list[torch.Tensor], rows: torch.Tensor) -> None:
    """Zero (in place) the rows of each [n, ...] tensor where `rows` [n] is true."""
    for t in ts:
        t.masked_fill_(rows.reshape((-1,) + (1,) * (t.dim() - 1)), 0.0)


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = float(a.norm()), float(b.norm())
    cos = float((a @ b) / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb == 0 else 0.0)
    mask = b.abs() > 1e-3 * (b.abs().max() + 1e-30)
    sign = float((torch.sign(a[mask]) == torch.sign(b[mask])).double().mean()) if mask.any() else 1.0
    return {"cosine": cos, "norm_ratio": na / nb if nb > 0 else math.inf,
            "sign_agreement": sign, "ep_norm": na, "true_norm": nb}


def check_gradients(eng: Engine, x: torch.Tensor, y: torch.Tensor, *, beta: float = 0.01,
                    nudge: str = "symmetric", tol: float = 1e-7, max_sweeps: int = 2000,
                    mode: str | None = None, freeze_pool: bool = True, seeds: int = 16,
                    seed: int = 0, estimate: str = "rates") -> dict:
    """Compare the EP estimate with the implicit gradient per coupling and per bias (for a
    graph with bernoulli neurons: `check_stochastic`, over `seeds` runs)."""
    if not (beta != 0 and math.isfinite(beta)):
        raise EpcError(f"--beta must be a nonzero finite number, got {beta}")
    if nudge not in ("symmetric", "one-sided"):
        raise EpcError(f"--nudge {nudge!r} (supported: symmetric, one-sided)")
    if eng.stochastic:
        return check_stochastic(eng, x, y, beta=beta, nudge=nudge, tol=tol,
                                max_sweeps=max_sweeps, mode=mode, freeze_pool=freeze_pool,
                                seeds=seeds, seed=seed, estimate=estimate)
    if estimate != "rates":
        raise EpcError(f"--estimate {estimate} applies to bernoulli neurons; this network's "
                       f"neurons are rate")
    return _check_rate(eng, x, y, beta=beta, nudge=nudge, tol=tol, max_sweeps=max_sweeps,
                       mode=mode, freeze_pool=freeze_pool)[0]


def _check_rate(eng: Engine, x: torch.Tensor, y: torch.Tensor, *, beta: float, nudge: str,
                tol: float, max_sweeps: int, mode: str | None,
                freeze_pool: bool) -> tuple[dict, dict]:
    """`check_gradients` of a rate network, and the true gradient."""
    mode = mode or eng.mode
    dt = eng.dtype
    batch = eng.prepare(x)
    y = y.to(eng.device)
    free = eng.settle(batch, max_sweeps=max_sweeps, tol=tol, mode=mode)
    rt = (free.routing or eng.routing(free.states, batch)) if freeze_pool else free.routing
    plus = eng.settle(batch, free.states, beta=beta, labels=y, max_sweeps=max_sweeps, tol=tol,
                      mode=mode, routing=rt)
    if nudge == "symmetric":
        minus = eng.settle(batch, free.states, beta=-beta, labels=y, max_sweeps=max_sweeps,
                           tol=tol, mode=mode, routing=rt)
        ep = ep_gradient(eng, batch, plus.states, minus.states, beta, routing=rt, labels=y)
    else:
        minus = None
        ep = ep_gradient(eng, batch, plus.states, free.states, beta, one_sided=True, routing=rt,
                         labels=y)
    true, info = implicit_gradient(eng, batch, free.states, y, mode="colour", routing=rt)
    rows = []
    learn = set(eng.learnable)
    for l in eng.links:
        ws = [w for w in dict.fromkeys(l.weights) if w in learn]
        if not ws:
            continue
        a = torch.cat([ep.get(w, torch.zeros_like(true[w])).reshape(-1) for w in ws])
        b = torch.cat([true[w].reshape(-1) for w in ws])
        rows.append({"name": l.name, "kind": l.kind, "src": l.src, "dst": l.dst,
                     "weights": ws, **_compare(a, b)})
    biases = []
    for j in eng.settled:
        bn = eng.states[j].bias
        if bn and bn in learn:
            biases.append({"name": bn, "state": j,
                           **_compare(ep.get(bn, torch.zeros_like(true[bn])), true[bn])})
    phases = [free, plus] + ([minus] if minus else [])
    unsettled = max(p.unconverged for p in phases)
    warnings = []
    if unsettled:
        warnings.append(f"{unsettled} of {int(x.shape[0])} samples did not settle to --tol "
                        f"{tol:g} within --max-sweeps {max_sweeps} in some phase; both "
                        f"gradients assume settled phases (the implicit one a fixed point): "
                        f"raise --max-sweeps")
    if not (math.isfinite(info["adjoint_residual"]) and all(
            math.isfinite(r["true_norm"]) for r in rows + biases)):
        warnings.append("the implicit gradient is not finite (its adjoint iteration diverged "
                        "at a state that is not a stable fixed point); the table compares "
                        "nothing")
    elif not info["converged"]:
        warnings.append(f"the implicit gradient's adjoint iteration did not converge "
                        f"({info['iterations']} iterations, last change "
                        f"{info['adjoint_residual']:.3g}): the free state is not a stable "
                        f"fixed point of the sweep, and the 'true' column is not the "
                        f"gradient")
    return {"beta": beta, "nudge": nudge, "mode": mode, "freeze_pool": freeze_pool,
            "pool_frozen_in_free_phase": free.routing is not None, "samples": int(x.shape[0]),
            "dtype": str(dt).replace("torch.", ""),
            "tol": tol, "sweeps": {"free": free.sweeps, "plus": plus.sweeps,
                                   "minus": minus.sweeps if minus else None},
            "unconverged": unsettled, "warnings": warnings,
            "implicit": info, "couplings": rows, "biases": biases,
            "min_cosine": min([r["cosine"] for r in rows + biases], default=1.0)}, true


# --------------------------------------------------------------------------- bernoulli
GRADCHECK_STREAM = 0x6C4ECC   # the generators of check-gradients' runs: (seed, this, run)


def mean_field(eng: Engine) -> Engine:
    """The engine of `eng`'s mean-field network: the same graph and weights with every
    neuron rate (deterministic), on the same device and dtype."""
    g = eng.graph.copy()
    g.weights.update(eng.weights_numpy() if eng.dtype == torch.float32 else
                     {k: v.detach().cpu().numpy() for k, v in eng.params.items()})
    for s in g.states:
        s.neuron = "rate"
    g.schedule.spiking = None
    return Engine(g, device=eng.device, dtype=eng.dtype, mode=eng.mode,
                  pool_freeze=eng.pool_freeze)


def check_stochastic(eng: Engine, x: torch.Tensor, y: torch.Tensor, *, beta: float,
                     nudge: str, tol: float, max_sweeps: int, mode: str | None,
                     freeze_pool: bool, seeds: int, seed: int, estimate: str) -> dict:
    """The stochastic EP estimate of a bernoulli network against the true gradient.

    In the mean-field limit the network is its rate twin (`mean_field`), so the reference
    is that twin's implicit gradient at its free fixed point, settled tightly (`tol`,
    `max_sweeps`), with the twin's deterministic EP estimate beside it. The stochastic
    estimate is what training computes: a free phase of the network's time steps, then
    the nudged phases (their noise as the graph's `sampling` says), from the rate
    estimates (or the spike trains, `estimate`). It is run `seeds` times from independent
    generators; per coupling (and bias) the table gives the cosine of their mean with the
    true gradient (and its norm ratio, sign agreement), and the spread: the mean and
    standard deviation of the single runs' cosines, and the standard error of the mean
    relative to its norm (|std over runs| / sqrt(K) / |mean|, all components together).
    """
    from .learn import ep_gradient, spike_train_gradient
    from .spikes import generator, mix_seed
    if seeds < 1:
        raise EpcError(f"--seeds must be >= 1, got {seeds}")
    if estimate not in ("rates", "spikes"):
        raise EpcError(f"--estimate {estimate!r} (supported: rates, spikes)")
    if estimate == "spikes" and nudge != "symmetric":
        raise EpcError("--estimate spikes compares the spike trains of the +beta and -beta "
                       "phases; it needs --nudge symmetric")
    ref, true = _check_rate(mean_field(eng), x, y, beta=beta, nudge=nudge, tol=tol,
                            max_sweeps=max_sweeps, mode=mode, freeze_pool=freeze_pool)
    mode = mode or eng.mode
    batch = eng.prepare(x)
    y = y.to(eng.device)
    record = estimate == "spikes"
    runs: list[dict] = []
    for k in range(seeds):
        gen = generator(eng.device, mix_seed(seed, GRADCHECK_STREAM, k))
        free = eng.settle(batch, mode=mode, gen=gen)
        rt = (free.routing or eng.routing(free.states, batch)) if freeze_pool else free.routing
        if nudge == "symmetric":
            plus, minus = eng.settle_pair(batch, free.states, beta=beta, labels=y, mode=mode,
                                          routing=rt, gen=gen, carry=free.carry,
                                          record=record)
            if record:
                g = spike_train_gradient(eng, batch, plus.recorded, minus.recorded, beta,
                                         routing=rt, labels=y)
            else:
                g = ep_gradient(eng, batch, plus.states, minus.states, beta, routing=rt,
                                labels=y)
        else:
            plus = eng.settle(batch, free.states, beta=beta, labels=y, mode=mode, routing=rt,
                              gen=gen, carry=free.carry)
            g = ep_gradient(eng, batch, plus.states, free.states, beta, one_sided=True,
                            routing=rt, labels=y)
        runs.append(g)
    learn = set(eng.learnable)

    def row(ws: list[str]) -> dict:
        flat = lambda g: torch.cat([g.get(w, torch.zeros_like(true[w])).reshape(-1)  # noqa
                                    for w in ws]).double()
        b = torch.cat([true[w].reshape(-1) for w in ws])
        each = torch.stack([flat(g) for g in runs])
        mean = each.mean(0)
        single = [_compare(e, b)["cosine"] for e in each]
        sd = each.std(0, unbiased=True) if seeds > 1 else torch.zeros_like(mean)
        se = float(sd.norm() / math.sqrt(seeds) / (mean.norm() + 1e-30))
        return {**_compare(mean, b), "single_cosine_mean": float(np.mean(single)),
                "single_cosine_std": float(np.std(single)), "relative_std_error": se}

    det = {r["name"]: r["cosine"] for r in ref["couplings"] + ref["biases"]}
    rows, biases = [], []
    for l in eng.links:
        ws = [w for w in dict.fromkeys(l.weights) if w in learn]
        if ws:
            rows.append({"name": l.name, "kind": l.kind, "src": l.src, "dst": l.dst,
                         "weights": ws, **row(ws), "mean_field_cosine": det.get(l.name)})
    for j in eng.settled:
        bn = eng.states[j].bias
        if bn and bn in learn:
            biases.append({"name": bn, "state": j, **row([bn]),
                           "mean_field_cosine": det.get(bn)})
    sp = eng.spiking
    return {**{k: ref[k] for k in ("beta", "nudge", "mode", "freeze_pool", "samples", "dtype",
                                   "tol", "implicit")},
            "stochastic": {"seeds": seeds, "time_steps": sp.time_steps,
                           "nudge_time_steps": sp.nudge_time_steps,
                           "averaging": sp.averaging, "tau": sp.tau, "sampling": sp.sampling,
                           "estimate": estimate},
            "sweeps": {"free": sp.time_steps, "plus": sp.nudge_time_steps,
                       "minus": sp.nudge_time_steps if nudge == "symmetric" else None,
                       "mean_field": ref["sweeps"]},
            "unconverged": ref["unconverged"], "warnings": ref["warnings"],
            "couplings": rows, "biases": biases,
            "min_cosine": min([r["cosine"] for r in rows + biases], default=1.0)}
