"""canonicalize: simplify a feedforward graph without changing what it computes.

Requires: a feedforward-form graph (nodes, outputs; no states), valid per compiler.verify,
          whose weights hold data (folding rewrites them).
Ensures:  a feedforward-form graph computing the same outputs (up to float32 rounding of
          folded weights), with the same inputs and as many outputs, in which
          * no BatchNorm, Identity or Dropout node remains;
          * a BatchNorm or ChannelScale directly after a Conv/Dense (optionally through that
            op's Bias) whose intermediate values have no other consumer is folded into the
            weights (per output channel) and its shift into one Bias; any other BatchNorm
            becomes ChannelScale + Bias;
          * no Bias directly follows a Bias whose value nothing else uses (they are merged);
          * a Softmax that is a graph output is dropped (the output becomes its input; the
            label cost of the energy form works on logits);
          * nodes that no output depends on are removed, and so are weights nothing
            refers to.
The pass manager checks these conditions, except 'the same outputs' (tests/test_passes.py
compares the two graphs' values).
"""
from __future__ import annotations

import numpy as np

from ..ir import (BatchNorm, Bias, ChannelScale, Conv, Dense, Dropout, Graph, Identity, Node,
                  Softmax, op_weights)
from ..options import CompileOptions
from . import conditions as C
from .manager import Pass


# --------------------------------------------------------------------------- helpers
def _weight_refs(g: Graph, wname: str) -> int:
    return sum(1 for n in g.nodes for w in op_weights(n.op).values() if w == wname)


def _producer(g: Graph, value: str) -> Node | None:
    for n in g.nodes:
        if n.name == value:
            return n
    return None


def _private(g: Graph, wname: str, base: str) -> str:
    """A weight name this pass may overwrite: `wname` itself when only one op refers to it,
    else a fresh copy (so a weight shared by several ops is not rescaled for all of them)."""
    if _weight_refs(g, wname) <= 1:
        return wname
    new = g.fresh_name(base)
    g.weights[new] = np.array(g.weights[wname], copy=True)
    return new


def _channel_shape(rank: int) -> tuple[int, ...]:
    """Broadcast shape of a per-channel vector over a per-sample value of this rank."""
    return (-1,) + (1,) * (rank - 1)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


# --------------------------------------------------------------------------- rewrites
def _drop_passthrough(g: Graph) -> None:
    """Identity and Dropout are the identity at inference; an output Softmax is dropped."""
    for n in list(g.nodes):
        drop = isinstance(n.op, (Identity, Dropout))
        if isinstance(n.op, Softmax):
            drop = n.name in g.outputs and g.uses(n.name) == g.outputs.count(n.name)
        if drop:
            g.nodes.remove(n)
            g.rewire(n.name, n.inputs[0])


def _split_batchnorm(g: Graph) -> None:
    """BatchNorm -> ChannelScale(k) + Bias(shift - mean * k), k = scale / sqrt(var + eps)."""
    i = 0
    while i < len(g.nodes):
        n = g.nodes[i]
        if isinstance(n.op, BatchNorm):
            bn = n.op
            w = {k: np.asarray(g.weights[v], dtype=np.float64) for k, v in op_weights(bn).items()}
            k = w["scale"] / np.sqrt(w["var"] + bn.epsilon)
            b = w["shift"] - w["mean"] * k
            kname = g.fresh_name(f"{n.name}.k")
            g.weights[kname] = _f32(k.reshape(-1))
            bname = g.fresh_name(f"{n.name}.b")
            g.weights[bname] = _f32(b.reshape(_channel_shape(len(n.shape))))
            sname = g.fresh_name(f"{n.name}.scale")
            scale = Node(sname, ChannelScale(kname), list(n.inputs), tuple(n.shape))
            # the Bias keeps the BatchNorm's name, so consumers and outputs need no rewiring
            g.nodes[i] = Node(n.name, Bias(bname), [sname], tuple(n.shape))
            g.nodes.insert(i, scale)
            i += 1
        i += 1


def _single_chain(g: Graph, node: Node) -> list[Node] | None:
    """For a ChannelScale node: the [linear, (bias)] nodes it can fold into, or None.

    The linear op must be a Conv or Dense and every value between it and the ChannelScale
    must have the next node as its only reader (else folding would change other readers).
    """
    prev = _producer(g, node.inputs[0])
    chain: list[Node] = []
    if prev is not None and isinstance(prev.op, Bias):
        if g.uses(prev.name) != 1:
            return None
        chain.insert(0, prev)
        prev = _producer(g, prev.inputs[0])
    if prev is None or not isinstance(prev.op, (Conv, Dense)) or g.uses(prev.name) != 1:
        return None
    return [prev] + chain


def _fold_channel_scales(g: Graph) -> None:
    for n in list(g.nodes):
        if not isinstance(n.op, ChannelScale):
            continue
        chain = _single_chain(g, n)
        if chain is None:
            continue
        k = np.asarray(g.weights[n.op.weight], dtype=np.float64).reshape(-1)
        lin = chain[0]
        wname = _private(g, lin.op.weight, f"{lin.name}.weight")
        w = np.asarray(g.weights[wname], dtype=np.float64)
        g.weights[wname] = _f32(w * k.reshape((-1,) + (1,) * (w.ndim - 1)))
        lin.op.weight = wname
        for b in chain[1:]:
            bname = _private(g, b.op.weight, f"{b.name}.bias")
            bw = np.asarray(g.weights[bname], dtype=np.float64)
            g.weights[bname] = _f32(bw * k.reshape(_channel_shape(len(b.shape))))
            b.op.weight = bname
        g.nodes.remove(n)
        g.rewire(n.name, n.inputs[0])


def _merge_biases(g: Graph) -> None:
    changed = True
    while changed:
        changed = False
        for n in g.nodes:
            if not isinstance(n.op, Bias):
                continue
            prev = _producer(g, n.inputs[0])
            if prev is None or not isinstance(prev.op, Bias) or g.uses(prev.name) != 1:
                continue
            a = np.asarray(g.weights[prev.op.weight], dtype=np.float64)
            b = np.asarray(g.weights[n.op.weight], dtype=np.float64)
            total = a + b  # broadcasts: [C,1,1] + [C,1,1] stays compact
            name = _private(g, prev.op.weight, f"{prev.name}.bias")
            g.weights[name] = _f32(total)
            n.op = Bias(name)
            n.inputs = list(prev.inputs)
            g.nodes.remove(prev)
            changed = True
            break


def _dead_code(g: Graph) -> None:
    live = set(g.outputs)
    for n in reversed(g.nodes):
        if n.name in live:
            live.update(n.inputs)
    g.nodes = [n for n in g.nodes if n.name in live]


def _drop_unused_weights(g: Graph) -> None:
    used = set(g.weight_names())
    g.weights = {k: v for k, v in g.weights.items() if k in used}


# --------------------------------------------------------------------------- pass
def requires(g: Graph, opts: CompileOptions) -> list[str]:
    return C.feedforward(g) or C.weight_data(g)


def ensures(before: Graph, after: Graph, opts: CompileOptions) -> list[str]:
    errs = C.feedforward(after) + C.canonical(after) + C.same_inputs(before, after)
    if len(after.outputs) != len(before.outputs):
        errs.append(f"{len(before.outputs)} outputs became {len(after.outputs)}")
    live = set(after.outputs)
    for n in reversed(after.nodes):
        if n.name in live:
            live.update(n.inputs)
        else:
            errs.append(f"node {n.name}: no output depends on it")
    unused = set(after.weights) - set(after.weight_names())
    if unused:
        errs.append(f"weight {sorted(unused)[0]}: nothing refers to it")
    for n in after.nodes:
        if isinstance(n.op, ChannelScale) and _single_chain(after, n) is not None:
            errs.append(f"node {n.name}: a channel scale left unfolded")
        prev = _producer(after, n.inputs[0]) if n.inputs else None
        if isinstance(n.op, Bias) and prev is not None and isinstance(prev.op, Bias) \
                and after.uses(prev.name) == 1:
            errs.append(f"node {n.name}: a bias after bias {prev.name} left unmerged")
    return errs


def transform(g: Graph, opts: CompileOptions) -> Graph:
    g = g.copy()
    _drop_passthrough(g)
    simplify(g)
    return g


def simplify(g: Graph) -> None:
    """This pass's rewrites other than dropping passthrough nodes and the output Softmax,
    in place: dead nodes removed, BatchNorm split, channel scales folded into the Conv/Dense
    before them, biases merged, unused weights dropped. The frontends' builder ends with
    it, so the graphs they produce are already folded, with the same arithmetic."""
    _dead_code(g)
    _split_batchnorm(g)
    _fold_channel_scales(g)
    _merge_biases(g)
    _drop_unused_weights(g)


PASS = Pass("canonicalize", transform, requires, ensures)
run = PASS.run

__all__ = ["run", "PASS", "simplify"]
