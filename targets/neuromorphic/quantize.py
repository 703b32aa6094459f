"""The quantization pass: an energy Graph (with schedule) -> a fixed-point Program.

Weights become signed mantissas of `weight_bits` bits with one power-of-two exponent per
weight (or per output channel); states become fixed point with `frac_bits` fractional
bits; biases and the nudge strength use the same state scale. Exponents are chosen from
the weights alone (least squared weight error among the candidates near the max-abs
exponent) or, given calibration activations, to minimise the error of each synapse's
forward and feedback outputs on real equilibria; with calibration, the mantissas are then
rounded with error compensation and the biases corrected (calibrate.py). Everything the
core cannot express (softmax costs, hard sigmoids with a slope, window-averaged or
non-power-of-two spike traces, average pools with a position-dependent divisor) is refused
here with an EpcError naming the entity. Bernoulli states become spiking groups (their
trace's decay shift, the spike seed, exact time-step phases: docs/isa.md, Spikes).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from epc.compiler import ops as O
from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph, op_weights

from .calibrate import bias_corrections, op_input_grams, round_compensated
from .isa import (BETA_FRAC, COST_WEIGHT_FRAC, TAU_SHIFT_RANGE, CostSpec, mix32, Group, Memory,
                  Phase, Program, SynOp, Synapse, bits_for_signed, bits_for_unsigned)

INPUT_INT_BITS = 8          # input memories: signed, F + 8 bits (range +-128)
FREE_INT_BITS = 8           # identity/relu states: F + 8 bits
BIAS_BITS = 16
EXP_BITS = 8
MAX_EXP_SPAN = 8            # per-channel exponents: at most this far below the largest
DEFAULT_BETA = 0.5
POOL_FREEZE = 20            # the float runtime's default (Engine pool_freeze)
SPIKE_SEED_SALT = 0x5EED5EED  # the compiler's spike_seed: H(seed ^ salt), 1 if that is 0
# the IR ops the core runs (each registry rule with a core instruction), for messages
CORE_KINDS = tuple(t.kind for t, r in O.RULES.items() if getattr(r, "core", None))


def _q_state(x: float, F: int) -> int:
    return int(math.floor(x * (1 << F) + 0.5))


def _lower_state(st, F: int) -> tuple[Memory, int, int, str]:
    a = st.act
    where = f"state {st.name}"
    if st.neuron not in ("rate", "bernoulli"):
        raise EpcError(f"{where}: neuron model {st.neuron!r} cannot run on the neuromorphic "
                       f"target (rate, bernoulli)")
    if st.neuron == "bernoulli" and not a.probability:
        raise EpcError(f"{where}: a bernoulli state needs an activation within [0, 1] (its "
                       f"firing probability), got {a.kind}")
    if a.kind == "hardsigmoid":
        if a.alpha == 1.0 and a.beta == 0.0:
            a_lo, a_hi = 0.0, 1.0
        else:
            raise EpcError(f"{where}: hard sigmoid with slope {a.alpha} and offset {a.beta} is "
                           f"not a clip; the core's activation is clamp(u, lo, hi) "
                           f"(use --activation clip:C)")
    elif a.kind == "clip":
        a_lo, a_hi = a.lo, a.hi
    elif a.kind == "relu":
        a_lo, a_hi = 0.0, None
    elif a.kind == "identity":
        a_lo, a_hi = None, None
    else:
        raise EpcError(f"{where}: activation {a.kind} is not supported by the neuromorphic "
                       f"target (clip, relu, identity)")
    if a_lo is not None and a_lo >= 0:
        lo = _q_state(a_lo, F)
        if a_hi is None:
            bits = F + FREE_INT_BITS
            return Memory(st.name, "state", False, bits, tuple(st.shape)), lo, (1 << bits) - 1, "relu"
        else:
            hi = _q_state(a_hi, F)
            bits = bits_for_unsigned(hi)
            if hi > 1 and hi & (hi - 1) == 0:
                # clip(0, 2^k): saturate one LSB below the bound so the state fits k bits
                # (e.g. clip(0, 1) at F = 8 is u8 0..255); documented in docs/isa.md.
                bits -= 1
                hi -= 1
        return Memory(st.name, "state", False, bits, tuple(st.shape)), lo, hi, "clip"
    if a_lo is None:
        bits = F + FREE_INT_BITS
        mem = Memory(st.name, "state", True, bits, tuple(st.shape))
        return mem, mem.lo, mem.hi, "identity"
    lo, hi = _q_state(a_lo, F), _q_state(a_hi, F)
    bits = bits_for_signed(lo, hi)
    return Memory(st.name, "state", True, bits, tuple(st.shape)), lo, hi, "clip"


def _quant_bias(b: np.ndarray, F: int) -> tuple[np.ndarray, int]:
    """A bias at state scale (F fractional bits) and the width its memory needs."""
    bq = np.floor(b * (1 << F) + 0.5).astype(np.int64)
    return bq, max(BIAS_BITS, bits_for_signed(int(bq.min(initial=0)), int(bq.max(initial=0))))


# --------------------------------------------------------------------------- weights
def _candidates(maxabs: float, qmax: int) -> list[int]:
    if maxabs <= 0:
        return [0]
    e0 = math.ceil(math.log2(maxabs / qmax))
    if maxabs / 2.0 ** e0 > qmax:   # float rounding at an exact power of two
        e0 += 1
    return [e0 - k for k in range(4)]


def _quant(w: np.ndarray, e: np.ndarray, qmax: int) -> np.ndarray:
    return np.clip(np.floor(w / 2.0 ** e + 0.5), -qmax, qmax)


def _bshape(e: np.ndarray, w: np.ndarray) -> np.ndarray:
    return e.reshape((-1,) + (1,) * (w.ndim - 1)) if e.size > 1 else e.reshape(())


def quantize_weight(w: np.ndarray, bits: int, per_channel: bool,
                    err_fn=None) -> tuple[np.ndarray, np.ndarray]:
    """Mantissas (int64, |M| <= 2^(bits-1) - 1) and exponents ([1] or [C_out], int64).

    err_fn(w_hat) -> per-channel (or scalar) error of a dequantized weight; default: the
    squared weight error."""
    w = np.asarray(w, dtype=np.float64)
    qmax = (1 << (bits - 1)) - 1
    if err_fn is None:
        def err_fn(wh):
            d = (wh - w) ** 2
            return d.reshape(d.shape[0], -1).sum(1) if per_channel and w.ndim > 0 else d.sum()
    if per_channel and w.ndim >= 1 and w.shape[0] > 1:
        rows = np.abs(w).reshape(w.shape[0], -1).max(1)
        cands = np.stack([np.array(_candidates(float(r), qmax)
                                   + [_candidates(float(r), qmax)[-1]] * (4 - len(_candidates(float(r), qmax))))
                          for r in rows])           # [C, 4]
        best_e = cands[:, 0].copy()
        best_err = np.full(w.shape[0], np.inf)
        for k in range(cands.shape[1]):
            e = cands[:, k]
            wh = _quant(w, _bshape(e, w), qmax) * 2.0 ** _bshape(e, w)
            err = np.asarray(err_fn(wh), dtype=np.float64).reshape(-1)
            if err.size == 1:
                err = np.full(w.shape[0], float(err[0]))
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_e = np.where(better, e, best_e)
        # The core aligns a synapse's products to its smallest exponent, so one near-zero
        # row (a dead neuron whose weights decayed) with a tiny exponent scales every other
        # row up in the accumulator; floor the exponents MAX_EXP_SPAN below the largest.
        # Such a row keeps a few mantissa levels at the floor, which is all it carries.
        # An all-zero row has no scale of its own (its mantissas are 0 whatever it gets).
        live = rows > 0
        top = best_e[live].max() if live.any() else best_e.max()
        best_e = np.where(live, best_e, top)
        e = np.maximum(best_e, top - MAX_EXP_SPAN).astype(np.int64)
    else:
        best = None
        for e0 in _candidates(float(np.abs(w).max()) if w.size else 0.0, qmax):
            e = np.array([e0], dtype=np.int64)
            wh = _quant(w, e.reshape(()), qmax) * 2.0 ** e0
            err = float(np.asarray(err_fn(wh)).sum())
            if best is None or err < best[0]:
                best = (err, e)
        e = best[1]
    m = _quant(w, _bshape(e, w), qmax).astype(np.int64)
    return m, e


def _calib_err_fn(g: Graph, coupling, wname: str, acts: dict, per_channel: bool):
    """Error of one synapse's forward and feedback outputs with weight `wname` replaced."""
    base = {k: torch.as_tensor(np.asarray(v), dtype=torch.float64) for k, v in g.weights.items()}
    xs = torch.as_tensor(acts[coupling.src], dtype=torch.float64)
    yd = torch.as_tensor(acts[coupling.dst], dtype=torch.float64)
    ref_f, ctx = O.chain_forward(coupling.ops, xs, base)
    ref_b = O.chain_adjoint(coupling.ops, yd, ctx, base) if coupling.feedback else None

    def err(wh):
        wd = dict(base)
        wd[wname] = torch.as_tensor(wh, dtype=torch.float64)
        f, ctx2 = O.chain_forward(coupling.ops, xs, wd)
        d = (f - ref_f) ** 2
        if per_channel and d.dim() >= 2 and d.shape[1] == wh.shape[0]:
            e = d.transpose(0, 1).reshape(d.shape[1], -1).sum(1)
        else:
            e = d.sum()
        if ref_b is not None:
            b = ((O.chain_adjoint(coupling.ops, yd, ctx2, wd) - ref_b) ** 2).sum()
            e = e + (b / e.numel() if e.dim() else b)
        return e.numpy()
    return err


def quantize_graph(g: Graph, *, weight_bits: int = 8, frac_bits: int = 8,
                   per_channel: bool = False, acts: dict | None = None,
                   beta: float = DEFAULT_BETA, lr_shift: int | None = None,
                   seed: int = 0, pool_freeze: int | None = POOL_FREEZE,
                   hold_pool: bool = True) -> Program:
    """Lower an energy graph to a Program (not yet validated: see validate.py).

    pool_freeze / hold_pool: the float runtime's max-pool winner rules (Engine.settle's
    `freeze_after`, training's `freeze_pool`); written into the program only when a
    max-pool acts on a settled state, so programs without one are unchanged."""
    _check_lowerable(g, weight_bits, frac_bits)
    F = frac_bits
    p = Program(name=g.name, frac_bits=F, beta_q=int(round(beta * (1 << BETA_FRAC))),
                seed=int(seed) & 0xFFFFFFFF)
    for inp in g.inputs:
        p.memories.append(Memory(inp.name, "input", True, F + INPUT_INT_BITS, tuple(inp.shape)))
        p.inputs.append(inp.name)
    bias_mems = _lower_states(g, p)
    if p.stochastic:
        _lower_spiking(g, p, seed)
    rounded = _lower_couplings(g, p, weight_bits, per_channel, acts)
    if acts is not None:
        for bname, delta in bias_corrections(g, acts, rounded).items():
            bm = bias_mems[bname]
            bm.data, bm.bits = _quant_bias(np.asarray(g.weights[bname], np.float64) + delta, F)
    _lower_costs(g, p)
    _lower_phases(g, p, pool_freeze, hold_pool)
    if p.stochastic:
        _spiking_phases(g, p)
    p.learn = [s.name for s in p.synapses if s.learn and any(o.w for o in s.ops)]
    p.learn += [gr.bias for gr in p.groups if gr.bias and gr.role != "teacher"]
    if lr_shift is None:
        lr_shift = default_lr_shift(beta, sharing=weight_sharing(g))
    p.lr_shift = int(lr_shift)
    p.meta = {"source": g.attrs.get("source", g.name), "weight_bits": str(weight_bits),
              "per_channel": str(bool(per_channel)).lower(),
              "scales": "calibrated" if acts is not None else "weights"}
    return p


def _check_lowerable(g: Graph, weight_bits: int, frac_bits: int) -> None:
    if not g.is_energy:
        raise EpcError(f"graph {g.name}: the neuromorphic target needs an energy graph "
                       f"(compile the model first)")
    if g.schedule is None:
        raise EpcError(f"graph {g.name}: no schedule; run the schedule pass first")
    heads = [s.name for s in g.states if s.readout]
    if heads:
        raise EpcError(f"graph {g.name}: readout head {heads[0]} (compiled with --readout) "
                       f"cannot run on the neuromorphic target: the core settles every state "
                       f"in its energy; compile without --readout")
    if not 2 <= weight_bits <= 16:
        raise EpcError(f"--weight-bits {weight_bits}: supported 2..16 (4-8 recommended)")
    if not 1 <= frac_bits <= 16:
        raise EpcError(f"--frac-bits {frac_bits}: supported 1..16")
    if any(not isinstance(w, np.ndarray) for w in g.weights.values()):
        raise EpcError(f"graph {g.name}: weights without data; compile from a bundle")


def _lower_states(g: Graph, p: Program) -> dict[str, Memory]:
    """A state memory and a group per state, a bias memory per biased state; returns the
    bias memories by bias weight name."""
    bias_mems: dict[str, Memory] = {}
    for st in g.states:
        mem, lo, hi, act = _lower_state(st, p.frac_bits)
        p.memories.append(mem)
        grp = Group(st.name, mem.name, lo, hi, st.role, None, act)
        if st.neuron == "bernoulli" and st.role != "teacher":
            grp.neuron = "bernoulli"
        if st.bias:
            b = np.asarray(g.weights[st.bias], dtype=np.float64)
            bq, bits = _quant_bias(b, p.frac_bits)
            bname = f"b.{st.name}"
            bias_mems[st.bias] = Memory(bname, "bias", True, bits, tuple(b.shape), bq)
            p.memories.append(bias_mems[st.bias])
            grp.bias = bname
        p.groups.append(grp)
    return bias_mems


def _lower_spiking(g: Graph, p: Program, seed: int) -> None:
    """The spike generators: the trace decay of every bernoulli group (the schedule's
    `trace:tau` with tau = 2^K: the core's trace decays by a shift) and the seed of the
    xorshift32 generators (never 0, their stuck state)."""
    sp = g.schedule.spiking
    if sp is None:
        raise EpcError(f"graph {g.name}: bernoulli states without time steps in the schedule; "
                       f"compile it with epc compile")
    if sp.averaging != "trace":
        raise EpcError(f"graph {g.name}: --averaging {sp.averaging}:{sp.tau}: the core keeps "
                       f"an exponential rate trace (a shift per step); compile with "
                       f"--averaging trace:K, K a power of two (e.g. trace:8)")
    if sp.tau < 1 or sp.tau & (sp.tau - 1) or sp.tau > (1 << TAU_SHIFT_RANGE[1]):
        raise EpcError(f"graph {g.name}: --averaging trace:{sp.tau}: the core's trace decays "
                       f"by 2^-K per step, so tau must be a power of two up to "
                       f"{1 << TAU_SHIFT_RANGE[1]} (e.g. trace:8)")
    for grp in p.groups:
        if grp.neuron == "bernoulli":
            grp.tau_shift = sp.tau.bit_length() - 1
    p.spike_seed = mix32((int(seed) ^ SPIKE_SEED_SALT) & 0xFFFFFFFF) or 1


def _spiking_phases(g: Graph, p: Program) -> None:
    """Every settling phase runs exactly its time steps and averages its second half (the
    float runtime's rule, runtime/spikes.py averaged_steps); the nudged phases continue
    the free phase's spike generators under sampling 'shared', else seed their own."""
    sp = g.schedule.spiking
    for ph in p.phases:
        if ph.name == "teacher":
            continue
        ph.sweeps = int(sp.time_steps if ph.name == "free" else sp.nudge_time_steps)
        ph.mean = max(1, ph.sweeps - ph.sweeps // 2)     # runtime/spikes.py averaged_steps
        if ph.name != "free":
            ph.noise = "free" if sp.sampling == "shared" else "own"


def _lower_couplings(g: Graph, p: Program, weight_bits: int, per_channel: bool,
                     acts: dict | None) -> dict[str, np.ndarray]:
    """A synapse per coupling, each op the core instruction its registry rule lowers it
    to; one weight and one exponent memory per weight name (shared weights stay shared).
    Returns the dequantized weights (for bias correction)."""
    done: dict[str, tuple[str, str]] = {}
    rounded: dict[str, np.ndarray] = {}
    shapes = {x.name: tuple(x.shape) for x in list(g.inputs) + list(g.states)}
    for c in g.couplings:
        where = f"coupling {c.name}"
        if c.feedback_gain != 1.0:
            raise EpcError(f"{where}: feedback gain {c.feedback_gain:g}: the core applies "
                           f"tied feedback at gain 1 (compile with --feedback-gain 1)")
        shape = shapes[c.src]
        lowered: list[SynOp] = []
        calibrated = acts is not None and c.src in acts and c.dst in acts
        for k, op in enumerate(c.ops):
            r = O.rule(op)
            if getattr(r, "core", None) is None:
                raise EpcError(f"{where}: op {op.kind} cannot be lowered to the neuromorphic "
                               f"core ({', '.join(CORE_KINDS)})")
            fields = r.lower(op, shape, where)
            if op_weights(op):   # a weighted instruction: one weight, with its exponents
                if op.weight not in done:
                    done[op.weight] = _lower_weight(g, p, c, k, weight_bits, per_channel,
                                                    acts if calibrated else None, rounded)
                fields["w"], fields["e"] = done[op.weight]
            lowered.append(SynOp(**fields))
            shape = O.out_shape(op, [shape], g.weights)
        p.synapses.append(Synapse(c.name, c.src, c.dst, lowered, c.kind, bool(c.feedback),
                                  learn=c.kind != "teacher"))
    return rounded


def _lower_weight(g: Graph, p: Program, c, k: int, weight_bits: int, per_channel: bool,
                  acts: dict | None, rounded: dict) -> tuple[str, str]:
    """The mantissa and exponent memories of the weight of op k of coupling c (with
    `acts`: calibrated on that coupling); returns their names."""
    name = c.ops[k].weight
    w = np.asarray(g.weights[name], dtype=np.float64)
    err = _calib_err_fn(g, c, name, acts, per_channel) if acts is not None else None
    # the exponents (scale grid) first, judged with plain rounding; then, calibrated, the
    # mantissas re-rounded on that grid with compensation
    m, e = quantize_weight(w, weight_bits, per_channel, err)
    grams = op_input_grams(c, k, acts[c.src], g.weights) if acts is not None else None
    if grams is not None:
        m = round_compensated(w, e, (1 << (weight_bits - 1)) - 1, grams)
    rounded[name] = m * 2.0 ** _bshape(e, w)
    wn, en = f"w.{name}", f"e.{name}"
    p.memories.append(Memory(wn, "weight", True, weight_bits, tuple(w.shape), m))
    p.memories.append(Memory(en, "exp", True, EXP_BITS, (int(e.size),), e))
    return wn, en


def _lower_costs(g: Graph, p: Program) -> None:
    for cost in g.costs:
        if cost.kind != "mse":
            raise EpcError(f"cost {cost.name}: kind {cost.kind} needs a softmax, which the "
                           f"integer core does not have; compile with --cost mse (and no "
                           f"distillation KL) for the neuromorphic target")
        wq = int(round(cost.weight * (1 << COST_WEIGHT_FRAC)))
        p.costs.append(CostSpec(cost.name, cost.state, cost.target, wq))
    if not p.costs:
        raise EpcError(f"graph {g.name}: no cost; the nudged phases need one")


def _lower_phases(g: Graph, p: Program, pool_freeze: int | None, hold_pool: bool) -> None:
    """The teacher pass (if any), the free and the two nudged phases in the schedule's
    colour classes, and the max-pool winner rules where a max-pool acts on a settled
    state."""
    from epc.compiler.reference import coupling_order
    teachers = [s.name for s in g.states if s.role == "teacher"]
    if teachers:
        order = [n for n in coupling_order(g) if n in teachers]
        p.phases.append(Phase("teacher", 1, [[n] for n in order]))
    settled = [s.name for s in g.settled_states()]
    if g.schedule.mode == "sync":
        classes = [list(settled)]
    else:
        classes = [[n for n in cls if n in settled] for cls in g.schedule.classes]
        classes = [c for c in classes if c]
    p.phases.append(Phase("free", int(g.schedule.max_sweeps), classes))
    p.phases.append(Phase("nudge+", int(g.schedule.nudge_sweeps), [list(c) for c in classes]))
    p.phases.append(Phase("nudge-", int(g.schedule.nudge_sweeps), [list(c) for c in classes]))
    settled_set = set(settled)
    if any(s.src in settled_set and any(O.core_rule(o.kind).piecewise for o in s.ops)
           for s in p.synapses):
        p.pool_freeze = int(pool_freeze or 0)
        for ph in p.phases:
            ph.hold_pool = bool(hold_pool) and ph.name in ("nudge+", "nudge-")


def default_lr_shift(beta: float, lr: float = 0.05, batch: int = 32, sharing: int = 1) -> int:
    """The shift giving the float EP step lr (mean over a batch) for a batch-summed update:
    2^-lr_shift ~= lr / (2 beta batch) (see docs/isa.md, learning step), divided by the
    square root of the weight sharing: a kernel applied at P positions sums P correlations
    into one step, and the plain-SGD core has no Adam to normalise it (conv1_digits and
    conv_digits on chip, digits: shift 9 saturates thousands of weights and collapses to
    chance in one epoch; conv1_digits after 3 epochs: shift 12 85.56%, 13 81.11%,
    14 73.89%, 15 57.78%)."""
    return int(round(-math.log2(lr / (2 * abs(beta) * batch)) + math.log2(max(sharing, 1)) / 2))


def weight_sharing(g: Graph) -> int:
    """The most positions one weight is applied at per sample over the learned couplings
    (a convolution's output pixels; 1 for dense layers)."""
    most = 1
    for c in g.couplings:
        if c.kind == "teacher":
            continue
        for op, m in zip(c.ops, O.chain_macs(c.ops, tuple(g.shape_of(c.src)), g.weights)):
            w = getattr(op, "weight", None)
            if isinstance(w, str) and w in g.weights:
                most = max(most, m // max(int(np.prod(np.shape(g.weights[w]))), 1))
    return most
