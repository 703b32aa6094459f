"""to_energy: turn a (canonical) feedforward graph into the energy form.

Every nonlinearity (Act node) becomes a State. Between nonlinearities everything is
affine, so each value of the feedforward graph is written as a *linear form*

    value = sum_k  L_k(src_k)  +  const

where src_k is a state or an input and L_k a chain of linear ops. A linear op appends
itself to every chain and is applied numerically to the constant; an Add concatenates the
terms and sums the constants; a Bias adds to the constant. At an Act node each term
becomes a Coupling(src_k -> state, L_k) and the constant becomes the state's bias.

A Concat (along the channels) is a sum too: each input's terms get a Pad that places them
at their channels, so a concatenated state has one coupling per part (a consumer of the
concatenation reads each part through its placement; feedback follows each coupling).
Ops that treat every channel alone (pools, spatial pads: their rule's `channelwise`) are
applied before such a placement rather than after it, consecutive pads are merged where
that is exact, and a term that a crop (a Split or Slice) leaves without any element is
dropped: after `x1, x2 = split(concat(a, b))` each half couples only to what lies in it.

MaxPool is only piecewise linear: max(x + c) = max(x) + c holds for a constant c that is
uniform over each channel's window, and max(a + b) != max(a) + max(b), so MaxPool of a sum
of two or more terms that share a channel (e.g. right after a residual Add), or of a
constant that varies within a channel, is refused with an EpcError naming the node; a
max-pool of a concatenation pools each part (their channels are disjoint).

Requires: a canonical feedforward graph (after canonicalize: no BatchNorm, Dropout,
          Identity or output Softmax; a Softmax elsewhere is an error here) with one output,
          whose weights hold data (constants are pushed through the linear ops).
Ensures:  an energy-form graph:
          * inputs unchanged; nodes and outputs empty; no teacher, no schedule;
          * one State per Act node, named h1..hN in feedforward order ('out' for the
            output): ReLU -> act = opts.activation,
            source_act = relu; Clip / HardSigmoid keep their own function (act = source_act);
          * the graph output is a State with role 'output': the Act's state when the output
            is a nonlinearity, else a new state 'out' (fresh-named if taken) with identity
            act (a linear readout);
          * one Coupling per term, kind 'forward', feedback False (symmetrize adds feedback),
            ops = the term's chain ([identity] when empty), named 'c_<src>__<dst>';
          * a state's constant is its bias weight '<state>.bias', stored [C, 1, 1] when
            uniform per channel of a [C, H, W] state, else in full shape; no bias when zero
            terms were ever added (no Bias upstream);
          * Cost 'label' on the output state, kind opts.cost, target 'label', weight 1;
          * with --neuron rate every state is 'rate'; with --neuron bernoulli every state
            but identity ones (linear readouts) is 'bernoulli', and its act lies in [0, 1]
            (a firing probability; any other act is refused with an EpcError naming it);
          * weights no longer referenced are removed.
The pass manager checks these conditions except the names and the biases' values
(tests/test_passes.py checks that one feedforward sweep of the result computes the source).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import ops as O
from ..errors import EpcError
from ..ir import (Act, Activation, Add, BatchNorm, Bias, Concat, Coupling, Cost, Dropout, Graph,
                  Identity, Pad, Permute, Softmax, State, op_weights)
from ..options import CompileOptions
from . import conditions as C
from .manager import Pass


@dataclass
class LinearForm:
    """sum of L(src) over `terms` plus `const` (None: zero), a value of `shape`."""

    shape: tuple[int, ...]
    terms: list[tuple[str, list]] = field(default_factory=list)
    const: np.ndarray | None = None  # float64, broadcastable to shape


def _apply_to_const(op, const: np.ndarray, in_shape, weights) -> np.ndarray:
    x = torch.as_tensor(np.broadcast_to(const, in_shape).copy(), dtype=torch.float64)[None]
    w = {k: torch.as_tensor(np.asarray(weights[k]), dtype=torch.float64)
         for k in op_weights(op).values()}
    return O.forward(op, x, w)[0][0].numpy()


# --------------------------------------------------------------------------- chains
def _channel_pad(op) -> tuple[int, int] | None:
    """(begin, end) of a Pad that pads or crops only the channels (axis 0), else None."""
    if not isinstance(op, Pad):
        return None
    r = len(op.pads) // 2
    if any(op.pads[i] for i in range(r) if i) or any(op.pads[r + i] for i in range(r) if i):
        return None
    return op.pads[0], op.pads[r]


def _compose_pads(a: Pad, b: Pad) -> Pad | None:
    """One Pad doing a then b, or None where that is not exact: per side, padding after a
    crop would bring back zeros where the crop removed data, so crop-then-pad stays two."""
    if len(a.pads) != len(b.pads):
        return None
    if any(x < 0 < y for x, y in zip(a.pads, b.pads)):
        return None
    return Pad([x + y for x, y in zip(a.pads, b.pads)])


def _append(chain: list, op, in_shape: tuple, weights) -> list:
    """`chain` (a term's ops, whose value has `in_shape`) followed by `op`, simplified: a
    channelwise op goes before a trailing placement of the channels (it then works on the
    part's channels only), consecutive pads merge, a pad of nothing disappears."""
    if chain and O.rule(op).is_channelwise(op) and not isinstance(op, Pad):
        cp = _channel_pad(chain[-1])
        if cp is not None:
            before = (in_shape[0] - cp[0] - cp[1], *in_shape[1:])
            inner = _append(chain[:-1], op, before, weights)
            out = O.out_shape(op, [before], weights)
            r = len(out)
            return inner + [Pad([cp[0]] + [0] * (r - 1) + [cp[1]] + [0] * (r - 1))]
    if isinstance(op, Pad):
        if chain and isinstance(chain[-1], Pad):
            merged = _compose_pads(chain[-1], op)
            if merged is not None:
                return _append(chain[:-1], merged, (), weights) if any(merged.pads) \
                    else chain[:-1]
        if not any(op.pads):
            return list(chain)
    return list(chain) + [op]


def _structural_zero(src_shape: tuple, chain: list, weights) -> bool:
    """Whether the chain maps everything to zero whatever its weights: its output on a
    source of ones, with every weight set to ones, is zero (only data movement, a crop of
    what a pad placed elsewhere, can do that)."""
    shape = tuple(src_shape)
    for op in chain:     # a crop past all that is there (of a part placed elsewhere)
        if isinstance(op, Pad) and len(op.pads) == 2 * len(shape) and any(
                d - max(-op.pads[i], 0) - max(-op.pads[len(shape) + i], 0) <= 0
                for i, d in enumerate(shape)):
            return True  # (merged with a pad after it, the shape alone can look fine)
        shape = tuple(O.out_shape(op, [shape], weights))
    ones = {k: torch.ones(np.shape(weights[k]), dtype=torch.float64)
            for op in chain for k in op_weights(op).values()}
    x = torch.ones((1, *src_shape), dtype=torch.float64)
    return not bool(O.chain_forward(chain, x, ones)[0].abs().sum() > 0)


def _moves_data(chain: list) -> bool:
    return any(isinstance(op, (Pad, Permute)) for op in chain)


def _channels_of(chain: list, shape: tuple) -> tuple[int, int]:
    """The channels [lo, hi) a term's value can occupy: where its last placement put it,
    or all of them."""
    cp = _channel_pad(chain[-1]) if chain else None
    if cp is None:
        return 0, shape[0]
    return max(cp[0], 0), shape[0] - max(cp[1], 0)


def _channel_uniform(const: np.ndarray, shape) -> bool:
    """Whether const (broadcast to shape [C, H, W]) is constant over each channel."""
    full = np.broadcast_to(const, shape)
    return bool(np.all(full == full[:, :1, :1]))


def compact(const: np.ndarray, shape) -> np.ndarray:
    """The smallest conventional shape of a constant: [C,1,1] if uniform per channel."""
    full = np.broadcast_to(const, shape)
    if len(shape) == 3 and _channel_uniform(full, shape):
        return np.ascontiguousarray(full[:, :1, :1])
    return np.ascontiguousarray(full)


def state_act(fn: Activation, opts: CompileOptions) -> tuple[Activation, Activation]:
    """(act, source_act) of the state replacing an Act node with function fn."""
    if fn.kind == "relu":
        return opts.activation, fn
    if fn.kind in ("clip", "hardsigmoid"):
        return fn, fn
    raise EpcError(f"activation {fn.kind} has no state form (supported: relu, clip, "
                   f"hardsigmoid)")


def neuron_for(act: Activation, opts: CompileOptions, where: str = "state") -> str:
    """opts.neuron for states with a nonlinear activation; 'rate' for identity states (a
    linear readout has no firing probability and stays deterministic).

    A Bernoulli (StochEP) neuron fires with probability rho(u), so rho must lie in [0, 1]
    (a hard sigmoid, or clip(lo, hi) inside [0, 1]): any other activation with bernoulli
    neurons is refused, naming the state.
    """
    if act.kind == "identity" or opts.neuron == "rate":
        return "rate"
    if not act.probability:
        shown = f"{act.kind}({', '.join(f'{k}={v}' for k, v in act.fields().items())})"
        raise EpcError(f"{where}: --neuron {opts.neuron} needs a firing probability "
                       f"rho(u) in [0, 1], but its activation {shown} is "
                       f"{'unbounded' if not act.bounded else 'not within [0, 1]'}; use "
                       f"--activation clip:1 or hardsigmoid (a ReLU in the model settles with "
                       f"--activation's function), or --neuron rate")
    return opts.neuron


def _fresh(g: Graph, base: str, reserved: set[str]) -> str:
    """g.fresh_name that also avoids `reserved` (names of states not yet created)."""
    name, i = g.fresh_name(base), 0
    while name in reserved:
        i += 1
        name = g.fresh_name(f"{base}_{i}")
    return name


def _emit_state(g: Graph, name: str, form: LinearForm, act: Activation, source_act: Activation,
                role: str, opts: CompileOptions, reserved: set[str] = frozenset()) -> None:
    """Append State `name` whose pre-activation is `form` (its couplings and bias)."""
    bias = None
    g.states.append(State(name, tuple(form.shape), act, source_act,
                          neuron_for(act, opts, f"state {name}"), role, None))
    if form.const is not None:
        bias = _fresh(g, f"{name}.bias", reserved)
        g.weights[bias] = compact(form.const, form.shape).astype(np.float32)
        g.states[-1].bias = bias
    for src, chain in form.terms:
        g.couplings.append(Coupling(_fresh(g, f"c_{src}__{name}", reserved), src, name,
                                    list(chain) if chain else [Identity()], "forward", False))


def convert(ff: Graph, opts: CompileOptions) -> Graph:
    """The energy form of the feedforward graph `ff` (which is not modified)."""
    g = ff.copy()
    nodes, g.nodes, out_name = g.nodes, [], g.outputs[0]
    g.outputs = []
    forms: dict[str, LinearForm] = {i.name: LinearForm(tuple(i.shape), [(i.name, [])])
                                    for i in g.inputs}
    out_state = None
    # States are named h1..hN in feedforward order and 'out' for the readout: source node
    # names (e.g. '/layer1/layer1.0/relu_1/Relu') make an unreadable energy graph.
    reserved: set[str] = set()
    hidden = 0
    for n in nodes:
        op, where = n.op, f"node {n.name} ({n.op.kind})"
        if isinstance(op, Act):
            x = forms[n.inputs[0]]
            if op.fn.kind == "identity":
                forms[n.name] = x
                continue
            act, src_act = state_act(op.fn, opts)
            role = "output" if n.name == out_name else "hidden"
            if role == "hidden":
                hidden += 1
            sname = g.fresh_name("out" if role == "output" else f"h{hidden}")
            _emit_state(g, sname, x, act, src_act, role, opts, reserved)
            forms[n.name] = LinearForm(tuple(n.shape), [(sname, [])])
            if role == "output":
                out_state = sname
        elif getattr(op, "linear", False):
            x = forms[n.inputs[0]]
            if O.rule(op).piecewise:     # a max-pool: linear only piece by piece
                spans = sorted(_channels_of(ch, x.shape) for _, ch in x.terms)
                if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
                    raise EpcError(f"{where}: max-pool of a sum of {len(x.terms)} terms (e.g. "
                                   f"after a residual add) is not linear and has no coupling "
                                   f"form; put an activation before the max-pool")
                if x.const is not None and x.terms and not _channel_uniform(x.const, x.shape):
                    raise EpcError(f"{where}: max-pool of a value with a bias that varies "
                                   f"within a channel has no coupling form")
            const = None
            if x.const is not None:
                const = _apply_to_const(op, x.const, x.shape, g.weights)
            terms = []
            for src, ch in x.terms:
                new = _append(ch, op, x.shape, g.weights)
                if isinstance(op, Pad) and min(op.pads) < 0 and _moves_data(ch) and \
                        _structural_zero(g.shape_of(src), new, g.weights):
                    continue        # a crop of what lies elsewhere: no coupling
                terms.append((src, new))
            forms[n.name] = LinearForm(tuple(n.shape), terms, const)
        elif isinstance(op, Concat):
            if op.axis != 0:
                raise EpcError(f"{where}: concatenation along per-sample axis {op.axis}; only "
                               f"the channels (axis 0) are supported")
            total, at = n.shape[0], 0
            terms, parts = [], []
            for v in n.inputs:
                f = forms[v]
                c = f.shape[0]
                r = len(f.shape)
                place = Pad([at] + [0] * (r - 1) + [total - at - c] + [0] * (r - 1))
                terms += [(src, _append(ch, place, f.shape, g.weights)) for src, ch in f.terms]
                parts.append(None if f.const is None else np.broadcast_to(f.const, f.shape))
                at += c
            const = None
            if any(p is not None for p in parts):
                const = np.concatenate([np.zeros(forms[v].shape) if p is None else p
                                        for v, p in zip(n.inputs, parts)], axis=0)
            forms[n.name] = LinearForm(tuple(n.shape), terms, const)
        elif isinstance(op, Bias):
            x = forms[n.inputs[0]]
            b = np.asarray(g.weights[op.weight], dtype=np.float64)
            const = b if x.const is None else x.const + b
            forms[n.name] = LinearForm(tuple(n.shape), list(x.terms), const)
        elif isinstance(op, Add):
            terms, const = [], None
            for v in n.inputs:
                f = forms[v]
                terms += f.terms
                if f.const is not None:
                    const = f.const if const is None else const + f.const
            forms[n.name] = LinearForm(tuple(n.shape), terms, const)
        elif isinstance(op, Softmax):
            raise EpcError(f"{where}: softmax is only supported as the model's output")
        elif isinstance(op, (BatchNorm, Dropout)):
            raise EpcError(f"{where}: run canonicalize before to_energy")
        else:
            raise EpcError(f"{where}: op {op.kind} has no energy form")
    if out_state is None:
        form = forms[out_name]
        name = g.fresh_name("out")
        ident = Activation.identity()
        _emit_state(g, name, form, ident, ident, "output", opts)
        out_state = name
    g.costs.append(Cost(g.fresh_name("label"), out_state, opts.cost, "label", 1.0, 1.0))
    used = set(g.weight_names())
    g.weights = {k: v for k, v in g.weights.items() if k in used}
    return g


def requires(g: Graph, opts: CompileOptions) -> list[str]:
    errs = C.feedforward(g) or C.canonical(g)
    if not errs and len(g.outputs) != 1:
        errs.append(f"{len(g.outputs)} outputs; epc compiles models with exactly one output")
    return errs or C.weight_data(g)


def _states_expected(ff: Graph) -> int:
    """One state per non-identity Act node, plus 'out' when the output is not one."""
    acts = {n.name for n in ff.nodes if isinstance(n.op, Act) and n.op.fn.kind != "identity"}
    return len(acts) + (ff.outputs[0] not in acts)


def ensures(before: Graph, after: Graph, opts: CompileOptions) -> list[str]:
    errs = C.energy(after) + C.same_inputs(before, after) + C.one_output_state(after)
    if errs:
        return errs
    if after.outputs or after.teacher or after.schedule:
        errs.append("outputs, a teacher or a schedule in the result")
    if len(after.states) != _states_expected(before):
        errs.append(f"{len(after.states)} states for {_states_expected(before)} "
                    f"nonlinearities and readouts")
    out = after.output_state().name
    errs += [f"state {s.name}: role {s.role}" for s in after.states
             if s.role not in ("hidden", "output")]
    errs += [f"state {s.name}: neuron {s.neuron} with an act outside [0, 1]"
             for s in after.states if s.neuron == "bernoulli" and not s.act.probability]
    errs += [f"state {s.name}: neuron {s.neuron}, expected "
             f"{'rate' if s.act.kind == 'identity' else opts.neuron}" for s in after.states
             if s.neuron != ("rate" if s.act.kind == "identity" else opts.neuron)]
    errs += [f"coupling {c.name}: kind {c.kind}, feedback {c.feedback} (expected forward, "
             f"no feedback)" for c in after.couplings if c.kind != "forward" or c.feedback]
    if [(k.state, k.kind, k.target, k.weight) for k in after.costs] != \
            [(out, opts.cost, "label", 1.0)]:
        errs.append(f"costs {[k.name for k in after.costs]}: expected one {opts.cost} label "
                    f"cost on {out}")
    unused = set(after.weights) - set(after.weight_names())
    if unused:
        errs.append(f"weight {sorted(unused)[0]}: nothing refers to it")
    return errs


def transform(g: Graph, opts: CompileOptions) -> Graph:
    if opts.cost not in ("mse", "ce"):
        raise EpcError(f"bad cost {opts.cost!r} (supported: mse, ce)")
    return convert(g, opts)


PASS = Pass("to_energy", transform, requires, ensures)
run = PASS.run
