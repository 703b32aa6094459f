"""EP's nudged phases settled as deviations from the free fixed point.

With feedback gains g < 1 (`epc compile --feedback-gain`), the nudge that reaches a state k
couplings below the output is beta * g^k times its adjoint (learn.feedback_compensation):
at 8 hidden layers and g = 0.1 about 1e-12 at the first, against states of order 0.1-1.
A nudged state s* + d held in float32 keeps d only down to s*'s last bit (~1e-8), so the
plain estimate of the deep couplings is rounding noise (measured on a 64-256x8-10 digits
MLP at initialisation: cosine with the true gradient 0.00-0.48 for the first four
couplings), while the same phases settled in float64 match it (>= 0.993).

Here the phases are settled in d = s - s* itself, so they resolve what float64 would at
float32's cost. Every coupling is linear in its source, so the drive of d is the couplings
applied to d; the input drive and the biases cancel. A clipped state keeps its free drive
u*: clip(u* + du) - clip(u*) = clamp(du, lo - u*, hi - u*) - clamp(0, lo - u*, hi - u*),
without cancellation. The cost gradient is taken at s* + d (the output's d is not small).
The EP difference of a dense coupling's s_j s_i^T is formed from the deviations:

    (s*_j + d+_j)(s*_i + d+_i)^T - (s*_j + d-_j)(s*_i + d-_i)^T
        = s*_j D_i^T + D_j s*_i^T + d+_j d+_i^T - d-_j d-_i^T,    D = d+ - d-

A phase stops when no state's deviation changed by more than `rtol` times its largest
magnitude in the last sweep (an absolute tolerance would stop before the nudge has reached
the deep states), or at the sweep cap.

Supported: dense couplings (optionally after a flatten) and identity couplings between
states or from inputs, clip / relu / identity activations, label costs on settled states,
no readout heads or teacher states. `supports` names the first thing that is not.
"""
from __future__ import annotations

import torch

from epc.compiler.errors import EpcError

from .engine import Engine
from .learn import feedback_compensation, reduce_to_shape

Tensor = torch.Tensor


class Deviation(dict):
    """A nudged phase as s* + d (a dict of states, for whatever reads states), with the
    free states `free` and the deviations `d` kept apart for the gradient."""

    def __init__(self, free: dict, d: dict):
        super().__init__({j: free[j] + d[j] for j in d})
        self.free, self.d = free, d


def supports(eng: Engine) -> str | None:
    """Why `eng`'s graph cannot settle its nudged phases as deviations (None if it can)."""
    for l in eng.links:
        if l.fast not in ("dense", "flat_dense", "identity"):
            return f"coupling {l.name} is not dense or identity"
    for j in eng.settled:
        if eng.acts[j].kind not in ("clip", "relu", "identity"):
            return f"state {j} has activation {eng.acts[j].kind}"
    if eng.readouts:
        return f"readout head {eng.readouts[0]}"
    if eng.teacher_links:
        return "a teacher"
    for c in eng.cost_list:
        if c.target != "label":
            return f"cost {c.name} is not a label cost"
    return None


def check(eng: Engine) -> None:
    why = supports(eng)
    if why is not None:
        raise EpcError(f"--nudge-form deviation: graph {eng.graph.name}: {why} (supported: "
                       f"dense and identity couplings, clip / relu / identity states, label "
                       f"costs)")


def _apply(l, x: Tensor, P: dict) -> Tensor:
    if l.fast == "dense":
        return x @ P[l.weight].t()
    if l.fast == "flat_dense":
        return x.reshape(x.shape[0], -1) @ P[l.weight].t()
    return x


def _adjoint(l, y: Tensor, P: dict) -> Tensor:
    if l.fast == "dense":
        return y @ P[l.weight]
    if l.fast == "flat_dense":
        return (y @ P[l.weight]).reshape((y.shape[0],) + l.src_shape)
    return y


def settle_pair(eng: Engine, batch: dict, free: dict, *, beta: float, labels: Tensor,
                max_sweeps: int, rtol: float = 1e-4) -> tuple[Deviation, Deviation, int]:
    """The +beta and -beta phases from the free states `free`, as one batch of 2n.
    Returns (plus, minus, sweeps)."""
    check(eng)
    P, n, gain = eng.params, batch["n"], eng.feedback_gain
    two = lambda t: torch.cat([t, t])   # noqa: E731
    s0 = {j: two(free[j]) for j in eng.settled}
    vals = {k: two(v) for k, v in batch["clamped"].items()}
    vals.update(s0)
    signs = torch.full((2 * n, 1), float(beta), dtype=eng.dtype, device=eng.device)
    signs[n:] = -float(beta)
    y2 = two(labels.to(eng.device))
    # the free drive u* of every clipped state, and the clamp bounds of its deviation
    bounds = {}
    for j in eng.settled:
        a = eng.acts[j]
        if a.kind == "identity":
            continue
        u = two(batch["const"][j])
        for l in eng.inbound[j]:
            u = u + _apply(l, vals[l.src], P)
        for l in eng.feedback[j]:
            u = u + gain.get(l.name, 1.0) * _adjoint(l, vals[l.dst], P)
        lo = -u if a.kind == "relu" else a.lo - u
        hi = None if a.kind == "relu" else a.hi - u
        zero = lo.clamp(min=0.0) if hi is None else torch.minimum(lo.clamp(min=0.0), hi)
        bounds[j] = (lo, hi, zero)
    targets = {c.name: eng.cost_target(c, {"clamped": vals}, y2) for c in eng.cost_list}
    d = {j: torch.zeros_like(s0[j]) for j in eng.settled}
    # a state the nudge has not reached yet has d = 0 and no change: not settled. Within
    # one sweep per settled state it has reached every state it ever will
    min_sweeps = min(len(eng.settled), max_sweeps)
    sweeps = 0
    for sweep in range(max_sweeps):
        worst = 0.0
        for cls in eng.classes:
            for j in cls:
                du = torch.zeros_like(d[j])
                for l in eng.inbound[j]:
                    du = du + _apply(l, d[l.src], P)
                for l in eng.feedback[j]:
                    du = du + gain.get(l.name, 1.0) * _adjoint(l, d[l.dst], P)
                for c in eng.costs[j]:
                    g = eng.cost_grad(c, s0[j] + d[j], targets[c.name])
                    du = du - signs.reshape((-1,) + (1,) * (du.dim() - 1)) * c.weight * g
                if j in bounds:
                    lo, hi, zero = bounds[j]
                    new = (torch.maximum(du, lo) if hi is None
                           else torch.minimum(torch.maximum(du, lo), hi)) - zero
                else:
                    new = du
                change, size = torch.stack([(new - d[j]).abs().amax(),
                                            new.abs().amax()]).tolist()
                worst = max(worst, change / size if size > 0 else 0.0)
                d[j] = new
        sweeps = sweep + 1
        if worst <= rtol and sweeps >= min_sweeps:
            break
    plus = Deviation(free, {j: v[:n] for j, v in d.items()})
    minus = Deviation(free, {j: v[n:] for j, v in d.items()})
    return plus, minus, sweeps


def ep_gradient(eng: Engine, batch: dict, plus: Deviation, minus: Deviation,
                beta: float) -> dict[str, Tensor]:
    """The symmetric EP estimate from two deviations (as learn.ep_gradient, corrected for
    feedback gains), its products formed from the deviations."""
    n = batch["n"]
    s0, dp, dm = plus.free, plus.d, minus.d
    comp = feedback_compensation(eng)
    learn = set(eng.learnable)
    scale = -1.0 / (2.0 * beta * n)
    out: dict[str, Tensor] = {}
    clamped = batch["clamped"]
    for j in eng.settled:
        D = (dp[j] - dm[j]).reshape(n, -1)
        for l in eng.input_links[j] + eng.inbound[j]:
            if l.fast == "identity" or l.weight not in learn:
                continue
            if l.src in clamped:
                g = D.t() @ clamped[l.src].reshape(n, -1)
            else:
                f = lambda t: t.reshape(n, -1)   # noqa: E731
                g = (f(s0[j]).t() @ f(dp[l.src] - dm[l.src]) + D.t() @ f(s0[l.src])
                     + f(dp[j]).t() @ f(dp[l.src]) - f(dm[j]).t() @ f(dm[l.src]))
            g = g * (scale * comp.get(l.weight, 1.0))
            out[l.weight] = out[l.weight] + g if l.weight in out else g
        b = eng.states[j].bias
        if b and b in learn:
            out[b] = reduce_to_shape(dp[j] - dm[j], tuple(eng.params[b].shape)) * (
                scale * comp.get(b, 1.0))
    return out
