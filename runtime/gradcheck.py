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
                    mode: str | None = None, freeze_pool: bool = True) -> dict:
    """Compare the EP estimate with the implicit gradient per coupling and per bias."""
    if not (beta != 0 and math.isfinite(beta)):
        raise EpcError(f"--beta must be a nonzero finite number, got {beta}")
    if nudge not in ("symmetric", "one-sided"):
        raise EpcError(f"--nudge {nudge!r} (supported: symmetric, one-sided)")
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
            "min_cosine": min([r["cosine"] for r in rows + biases], default=1.0)}
