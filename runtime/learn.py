"""Learning: the EP gradient estimate from two nudged equilibria, and the optimisers.

EP estimate (per weight, averaged over the batch):

    symmetric:  grad = -( dPhi/dtheta(s+) - dPhi/dtheta(s-) ) / (2 beta)
    one-sided:  grad = -( dPhi/dtheta(s+) - dPhi/dtheta(s*) ) / beta

dPhi/dW of a dense coupling is s_dst^T s_src (a matmul). A chain whose one learnable
weight is its last op's (max-pool -> conv, a conv alone, flatten -> dense) takes that op's
weight gradient (its registry rule's `weight_grad`) at the chain's prefix, for both phases
in one call (the chain's op itself is never applied). Any other chain takes the autograd
gradient of <s_dst, L(s_src)> w.r.t. its weights. Either runs once per batch, outside the
settling loop. dPhi/db_j = s_j summed over the axes b_j broadcasts over. Weights shared by several couplings accumulate.

A readout head (outside the energy, `epc compile --readout`) enters the nudged energy only
through beta * C(o), so the same difference quotient gives its weights dC/dtheta at the
nudged states: the mean over the +beta and -beta phases (symmetric), at the +beta phase
(one-sided). That needs the labels.

The optimisers (SGD with momentum, Adam) are written out here rather than taken from
torch.optim so that their whole state is a flat dict of named arrays that a checkpoint
bundle stores and a resumed run restores exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from epc.compiler import ops as O
from epc.compiler.errors import EpcError
from epc.compiler.ir import op_weights
from epc.compiler.ops import reduce_to_shape

from .engine import Engine

Tensor = torch.Tensor


def phi_grad_diff(eng: Engine, batch: dict, sa: dict, sb: dict,
                  routing: dict | None = None) -> dict[str, Tensor]:
    """dPhi/dtheta(sa) - dPhi/dtheta(sb), summed over the batch, for every learnable weight."""
    P = eng.params
    learn = set(eng.learnable)
    out: dict[str, Tensor] = {}

    def acc(name: str, g: Tensor):
        out[name] = out[name] + g if name in out else g

    clamped = batch["clamped"]
    for j in eng.settled:
        if j in eng.is_readout:           # not in Phi: see readout_gradient
            continue
        for l in eng.input_links[j] + eng.inbound[j]:
            if not any(w in learn for w in l.weights):
                continue
            xa = clamped[l.src] if l.src in clamped else sa[l.src]
            xb = clamped[l.src] if l.src in clamped else sb[l.src]
            n = xa.shape[0]
            if l.fast in ("dense", "flat_dense"):
                xa2, xb2 = xa.reshape(n, -1), xb.reshape(n, -1)
                acc(l.weight, sa[j].t() @ xa2 - sb[j].t() @ xb2)
                continue
            ws = [w for w in dict.fromkeys(l.weights) if w in learn]
            if l.fast == "chain" and _last_op_learns_alone(l, learn):
                acc(ws[0], _last_op_grad_diff(eng, l, xa, xb, sa[j], sb[j], routing))
                continue
            leaves = {w: P[w].detach().requires_grad_(True) for w in ws}
            PP = dict(P)
            PP.update(leaves)
            with torch.enable_grad():
                ya = eng.link_forward(l, xa, PP, routing)[0]
                yb = eng.link_forward(l, xb, PP, routing)[0]
                phi = (sa[j] * ya).sum() - (sb[j] * yb).sum()
                grads = torch.autograd.grad(phi, [leaves[w] for w in ws])
            for w, g in zip(ws, grads):
                acc(w, g)
        b = eng.states[j].bias
        if b and b in learn:
            acc(b, reduce_to_shape(sa[j] - sb[j], tuple(P[b].shape)))
    return out


def _last_op_learns_alone(l, learn: set) -> bool:
    """The chain's one learnable weight belongs to its last op, whose rule has a direct
    weight gradient (a conv or a dense)."""
    last = l.ops[-1]
    return (O.rule(last).weight_grad is not None and last.weight in learn
            and not any(w in learn for op in l.ops[:-1] for w in op_weights(op).values()))


def _last_op_grad_diff(eng: Engine, l, xa: Tensor, xb: Tensor, ga: Tensor, gb: Tensor,
                       routing: dict | None) -> Tensor:
    """dPhi/dW(a) - dPhi/dW(b) of a chain whose learnable weight is its last op's.

    Phi holds <s_j, W * p(x)> with p the ops before W (none learnable), so dPhi/dW is the op's
    weight gradient with input p(x) and output gradient s_j: the convolution (or matmul)
    itself is never applied, unlike autograd through Phi, which runs it forward first.
    The two phases are one call: the weight gradient is linear in the batch, so the
    difference is the gradient over both phases stacked, with -s_j for the second; when
    the source is the same tensor in both (a clamped input) it is one call on
    s_j(a) - s_j(b)."""
    P = eng.params
    op = l.ops[-1]
    pa = eng.link_prefix(l, xa, P, routing)[0]
    if xa is xb:
        x, g = pa, ga - gb
    else:
        pb = eng.link_prefix(l, xb, P, routing)[0]
        x, g = torch.cat([pa, pb]), torch.cat([ga, -gb])
    return O.rule(op).weight_grad(op, x, g, P)


def readout_gradient(eng: Engine, batch: dict, phases: list[tuple[dict, float]],
                     labels: Tensor | None, routing: dict | None = None) -> dict[str, Tensor]:
    """sum over (states, share) in `phases` of share * dC/dtheta for every readout head's
    learnable weights, summed over the batch; o is re-evaluated at each phase's states."""
    P = eng.params
    learn = set(eng.learnable)
    out: dict[str, Tensor] = {}
    for r in eng.readouts:
        ws = list(dict.fromkeys(
            w for l in eng.input_links[r] + eng.inbound[r] for w in l.weights if w in learn))
        b = eng.states[r].bias
        if not eng.costs[r] or not (ws or (b and b in learn)):
            continue
        leaves = {w: P[w].detach().requires_grad_(True) for w in ws}
        PP = dict(P)
        PP.update(leaves)
        total, gsum = 0.0, 0.0
        with torch.enable_grad():
            for s, share in phases:
                # dC/dW = <dC/do, do/dW>: autograd through o with dC/do held fixed
                o = eng.readout(r, {**batch["clamped"], **s}, PP, routing)
                od = o.detach()
                g = sum(c.weight * eng.cost_grad(c, od, eng.cost_target(c, batch, labels))
                        for c in eng.costs[r])
                total = total + share * (g * o).sum()
                gsum = gsum + share * g
            grads = torch.autograd.grad(total, [leaves[w] for w in ws]) if ws else []
        for w, gw in zip(ws, grads):
            out[w] = out[w] + gw if w in out else gw
        if b and b in learn:          # dC/db = dC/do, summed where b broadcasts
            out[b] = reduce_to_shape(gsum, tuple(P[b].shape))
    return out


def feedback_compensation(eng: Engine) -> dict[str, float]:
    """Per learnable weight, the factor that turns EP's estimate under feedback gains into
    the gradient of the loss (at beta -> 0); {} when no coupling has a gain.

    With gains, the settling is the gradient flow of an energy in the rescaled states
    t_j = s_j / a_j (`Engine.feedback_scales`), where EP is exact; back in s, a weight into
    state j (and j's bias) gets its true gradient from the plain estimate times
    (a_out / a_j)^2: the product of 1 / gain over the couplings from j up to the output.
    Without it the deep layers' estimates shrink geometrically with depth, and under an
    L2 weight decay (or at small learning rates) those layers die."""
    a2 = eng.feedback_scales()
    if a2 is None:
        return {}
    out: dict[str, float] = {}
    for l in eng.links:
        if l.dst in a2:
            for w in l.weights:
                out[w] = 1.0 / a2[l.dst]
    for j in eng.settled:
        b = eng.states[j].bias
        if b and j in a2:
            out[b] = 1.0 / a2[j]
    return out


def ep_gradient(eng: Engine, batch: dict, s_plus: dict, s_minus: dict, beta: float,
                one_sided: bool = False, routing: dict | None = None,
                labels: Tensor | None = None) -> dict[str, Tensor]:
    """The EP estimate of dL/dtheta (L averaged over the batch).

    Symmetric: s_minus is the -beta phase; one-sided: s_minus is the free fixed point.
    Couplings with feedback gains (feedback regulation) are corrected for them, so the
    estimate is that of the gradient of the loss in every case (feedback_compensation).
    `labels` are needed when the graph has readout heads with label costs.
    """
    n = batch["n"]
    scale = -1.0 / ((beta if one_sided else 2.0 * beta) * n)
    # with feedback gains, the plain estimate of a weight into state j is its gradient
    # times a_j^2 / a_out^2 (feedback_compensation): divided out here
    comp = feedback_compensation(eng)
    out = {k: v * (scale * comp.get(k, 1.0))
           for k, v in phi_grad_diff(eng, batch, s_plus, s_minus, routing).items()}
    if eng.readouts:
        phases = [(s_plus, 1.0)] if one_sided else [(s_plus, 0.5), (s_minus, 0.5)]
        for k, v in readout_gradient(eng, batch, phases, labels, routing).items():
            out[k] = out[k] + v / n if k in out else v / n
    return out


def spike_train_gradient(eng: Engine, batch: dict, rec_plus: list[dict],
                         rec_minus: list[dict], beta: float, one_sided: bool = False,
                         routing: dict | None = None,
                         labels: Tensor | None = None) -> dict[str, Tensor]:
    """The EP estimate from spike trains (bernoulli graphs, `--estimate spikes`): the
    difference quotient of dPhi/dtheta averaged over the recorded time steps of the two
    nudged phases (Engine.settle's `record`), each step's bernoulli states taken as their
    spikes and the other states as their values. For a dense coupling between two
    bernoulli states that is the co-spike count z_dst z_src^T per step, where the rate
    estimate takes r_dst r_src^T."""
    if not rec_plus or len(rec_plus) != len(rec_minus):
        raise EpcError("the spike-train estimate needs the same number of recorded steps "
                       "of both nudged phases")
    k = len(rec_plus)
    rep = lambda t: torch.cat([t] * k)   # noqa: E731
    stacked = {"n": batch["n"] * k, "clamped": {j: rep(v) for j, v in batch["clamped"].items()},
               "const": {j: rep(v) for j, v in batch["const"].items()}}
    sp = {j: torch.cat([r[j] for r in rec_plus]) for j in rec_plus[0]}
    sm = {j: torch.cat([r[j] for r in rec_minus]) for j in rec_minus[0]}
    rt = None
    if routing is not None:
        rt = eng._routing_rows(routing, rep)
    return ep_gradient(eng, stacked, sp, sm, beta, one_sided=one_sided, routing=rt,
                       labels=None if labels is None else rep(labels))


# =========================================================================== optimisers
class NonFiniteGradient(EpcError):
    """A gradient held NaN/Inf; the optimiser applied nothing."""

    def __init__(self, name: str):
        super().__init__(f"the gradient of {name} holds NaN/Inf")
        self.name = name


class Optimizer:
    """SGD (momentum, Nesterov off) or Adam over named tensors, with weight decay,
    a cosine learning-rate schedule and gradient-norm clipping.

    `lr_scales` (name -> factor, runtime/layer_lrs.py): per-weight learning rates, each
    the schedule's rate times its factor, as torch's parameter groups would give them
    (the decoupled shrink is by each weight's own rate, as AdamW's per group). Without
    factors (or all 1) the update is the same bits as before they existed.

    Weight decay is an L2 term added to the gradient (the default) or, with `decoupled`,
    a shrink of the weights by lr * weight_decay before each step (AdamW). Under Adam
    the L2 term is normalised like the gradient, so a weight whose gradient is much
    smaller than weight_decay * w shrinks by about lr a step whatever weight_decay is:
    a deep MLP at PyTorch's initialisation, where the signal fades with depth and the
    gradients are small, loses its deep layers within an epoch.

    The optimised tensors are moved into one flat buffer: `params[k]` is replaced, in the
    caller's dict, by a view of it holding the same values. An update is then about ten
    element-wise calls on that buffer whatever the number of weights (looping over an
    MLP's four small tensors cost a tenth of its EP step). Callers must index `params` by
    name, not keep tensors taken from it before the optimiser was made.

    State is a dict of named arrays (`state_arrays` / `load_state_arrays`), so a checkpoint
    restores it bit for bit.
    """

    def __init__(self, params: dict[str, Tensor], names: list[str], *, kind: str = "adam",
                 lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 clip: float | None = None, cosine: bool = True, total_steps: int = 1,
                 lr_min: float = 0.0, decoupled: bool = False,
                 lr_scales: dict[str, float] | None = None):
        if kind not in ("sgd", "adam"):
            raise EpcError(f"unknown optimiser {kind!r} (supported: sgd, adam)")
        if not lr > 0:
            raise EpcError(f"learning rate must be > 0, got {lr}")
        self.params, self.names, self.kind = params, list(names), kind
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay
        self.decoupled = decoupled
        self.betas, self.eps, self.clip = betas, eps, clip
        self.cosine, self.total_steps, self.lr_min = cosine, max(1, total_steps), lr_min
        self.step_count = 0      # updates applied (Adam's bias correction counts these)
        self.skipped_count = 0   # steps that applied nothing (they still move the schedule)
        self.sizes = [params[k].numel() for k in self.names]
        like = next(iter(params.values())) if params else torch.zeros(0)
        self.flat = (torch.cat([params[k].detach().reshape(-1) for k in self.names])
                     if self.names else like.new_zeros(0))
        for k, v in zip(self.names, self.flat.split(self.sizes)):
            params[k] = v.view(params[k].shape)
        # a floor for vh whose sqrt is under a quarter ulp of eps in the moments' dtype
        # (see _update); a normal number for any eps above ~1e-11 in float32
        self.sqrt_floor = ((eps * torch.finfo(self.flat.dtype).eps / 8) ** 2
                           if eps > 0 and self.flat.is_floating_point() else 0.0)
        # the per-weight factors on the rate: one flat tensor (None: all 1)
        scales = {k: float(v) for k, v in (lr_scales or {}).items()}
        stray = sorted(set(scales) - set(self.names))
        if stray:
            raise EpcError(f"learning-rate factor for {stray[0]!r}, which is not optimised")
        self.lr_scales = {k: scales.get(k, 1.0) for k in self.names}
        self.scale_flat = None
        if any(v != 1.0 for v in self.lr_scales.values()):
            self.scale_flat = torch.cat([self.flat.new_full((n,), self.lr_scales[k])
                                         for k, n in zip(self.names, self.sizes)])
        self.m_flat = torch.zeros_like(self.flat)
        self.v_flat = torch.zeros_like(self.flat) if kind == "adam" else None
        self.m = self._named(self.m_flat)
        self.v = self._named(self.v_flat) if kind == "adam" else {}

    def lr_of(self, name: str) -> float:
        """The rate weight `name` is updated at now (the schedule's times its factor)."""
        return self.current_lr() * self.lr_scales[name]

    def _named(self, flat: Tensor) -> dict[str, Tensor]:
        return {k: v.view(self.params[k].shape)
                for k, v in zip(self.names, flat.split(self.sizes))}

    def current_lr(self) -> float:
        if not self.cosine:
            return self.lr
        t = min(self.step_count + self.skipped_count, self.total_steps) / self.total_steps
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * t))

    def skip(self) -> None:
        """A step that applies no update (the trainer's implicit gradient had no sample left):
        the learning-rate schedule moves on as it would have, the moments do not."""
        self.skipped_count += 1

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor]) -> float:
        """Apply one update; returns the gradient norm before clipping. A gradient with
        NaN/Inf (the norm is then not finite) raises NonFiniteGradient and changes nothing.
        Weights without a gradient in `grads` are left alone (their moments too)."""
        names = [k for k in self.names if grads.get(k) is not None]
        if not names:
            self.step_count += 1
            return 0.0
        if len(names) == len(self.names):      # the usual case: one flat update
            parts = [(self.flat, torch.cat([grads[k].reshape(-1) for k in names]),
                      self.m_flat, self.v_flat, self.scale_flat)]
        else:
            parts = [(self.params[k], grads[k], self.m[k], self.v.get(k),
                      self.lr_scales[k] if self.lr_scales[k] != 1.0 else None)
                     for k in names]
        gs = [g for _, g, _, _, _ in parts]
        norm = math.sqrt(sum(torch.stack([(g * g).sum() for g in gs]).tolist()))
        if not math.isfinite(norm):
            bad = next((k for k in names if not torch.isfinite(grads[k]).all()), None)
            if bad is not None:
                raise NonFiniteGradient(bad)
            # finite gradients whose float32 sum of squares overflowed
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs))
        factor = 1.0
        if self.clip and norm > self.clip:
            factor = self.clip / (norm + 1e-12)
        lr = self.current_lr()
        self.step_count += 1
        for p, g, m, v, scale in parts:
            # a weight's own rate: the schedule's times its factor (a tensor over the flat
            # buffer, or one number); without factors, the plain float as before
            self._update(p, g, m, v, factor, lr if scale is None else lr * scale)
        return norm

    def _update(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor | None, factor: float,
                lr: "float | Tensor") -> None:
        """One step on one tensor (the flat buffer, or one weight), in place. `lr`: a
        number, or a tensor of per-element rates the shape of `p`."""
        if factor != 1.0:
            g = g * factor
        if self.wd and self.decoupled:
            p.mul_(1.0 - lr * self.wd)      # (a tensor of rates: each weight's own shrink)
        elif self.wd:
            g = g + p * self.wd
        if self.kind == "sgd":
            m.mul_(self.momentum).add_(g)
            p.sub_(m * lr)
            return
        b1, b2 = self.betas
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        mh = m / (1 - b1 ** self.step_count)
        vh = v / (1 - b2 ** self.step_count)
        if self.sqrt_floor:
            # torch's CPU sqrt takes a slow path on zeros and denormals (5-20x slower
            # than on normal numbers), and weights that never get a gradient (an MLP's
            # weights from always-blank pixels: 20% of mlp3's) keep v = 0. Below the
            # floor, sqrt(vh) is under a quarter ulp of eps, so sqrt(vh) + eps rounds to
            # eps either way: the update is bit-identical.
            vh.clamp_min_(self.sqrt_floor)
        p.sub_((mh * lr) / (vh.sqrt_().add_(self.eps)))

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {"opt.step": np.array([self.step_count], dtype=np.int64),
               "opt.skipped": np.array([self.skipped_count], dtype=np.int64)}
        for k in self.names:
            out[f"opt.m.{k}"] = self.m[k].detach().cpu().numpy()
            if self.kind == "adam":
                out[f"opt.v.{k}"] = self.v[k].detach().cpu().numpy()
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray], where: str) -> None:
        try:
            self.step_count = int(arrays["opt.step"][0])
            # checkpoints written before skipped steps were counted: none were
            self.skipped_count = int(arrays.get("opt.skipped", [0])[0])
            for k in self.names:
                self.m[k].copy_(torch.as_tensor(arrays[f"opt.m.{k}"]))
                if self.kind == "adam":
                    self.v[k].copy_(torch.as_tensor(arrays[f"opt.v.{k}"]))
        except (KeyError, RuntimeError) as e:
            raise EpcError(f"{where}: incompatible checkpoint: optimiser state does not match "
                           f"this model and optimiser ({e})")
