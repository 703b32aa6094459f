"""residual: mark skip links.

A residual Add of the source model leaves a state with several inbound couplings. The one
coming from the deepest source (longest coupling path from the inputs) is the main path
and stays 'forward'; the others become 'residual' (skip links). Among couplings from
equally deep sources (e.g. Add(conv(h), h)) the one whose chain carries weights wins, then
the longer chain, then the earlier one. A residual chain made only of identity ops becomes
the single weightless op [identity]. With opts.identity_skip == 'learned', each identity
skip instead gets a learned map initialised to the identity matrix (a 1x1 conv for a
[C, H, W] state, a dense layer for a 1-D state), so the compiled network still computes
the source model exactly at initialisation.

opts.skip_gain G != 1 scales every skip between two states by G at initialisation: an
identity skip becomes a learned map initialised to G times the identity, a weighted skip
(a projection) has its first weight multiplied by G (the chains are linear once in energy
form, so the skip's output scales by G). Why: with symmetric feedback the skips of a
ResNet chain the states they join in both directions, and a chain of n states coupled
with gain 1 makes the energy non-convex along it (the least eigenvalue of I - A is
1 - 2 cos(pi / (n + 1)) < 0 for n >= 3), so the free phase runs into the activation bounds;
G < 1 / (2 cos(pi / (n + 1))) keeps such a chain convex. Skips from an input carry no
feedback, form no chain and keep their gain. A skip that only moves data (the placement of a
concatenated part) gets a learned map G times the identity in front of its chain. The compiled graph then no longer computes
the source model (`--verify` refuses the combination).

Requires: an energy-form graph whose non-teacher, non-tap couplings form a DAG; with
          skip_gain != 1 its weights hold data (projections are rescaled).
Ensures:  the same states, costs and couplings (names, ends, in order); every state with an
          inbound coupling of kind 'forward' or 'residual' has exactly one inbound
          'forward' coupling (from its deepest source); all its other such inbound
          couplings have kind 'residual', and none of those is a chain of two or more
          identity ops. States without inbound couplings (bias only) have none. Tap and
          teacher couplings are untouched. With skip_gain G != 1 every residual coupling
          from a state carries a weight and computes G times its output at G = 1.
The pass manager checks these conditions, except 'from its deepest source' and 'G times
its output' (tests/test_passes.py and tests/passes/residual_*.epir check those).
"""
from __future__ import annotations

import networkx as nx
import numpy as np

from ..errors import EpcError
from ..ir import Conv, Coupling, Dense, Graph, Identity, op_weights
from ..options import CompileOptions
from . import conditions as C
from .manager import Pass

MAIN_KINDS = ("forward", "residual")


def depths(g: Graph, kinds=MAIN_KINDS) -> dict[str, int]:
    """Longest coupling path (number of couplings) from any input to each state/input."""
    dg = nx.DiGraph()
    dg.add_nodes_from(i.name for i in g.inputs)
    dg.add_nodes_from(s.name for s in g.states)
    dg.add_edges_from((c.src, c.dst) for c in g.couplings if c.kind in kinds)
    try:
        order = list(nx.topological_sort(dg))
    except nx.NetworkXUnfeasible:
        raise EpcError(f"graph {g.name}: couplings form a cycle")
    depth = {n: 0 for n in dg.nodes}
    for n in order:
        for m in dg.successors(n):
            depth[m] = max(depth[m], depth[n] + 1)
    return depth


def output_depth(g: Graph) -> int:
    """The output states' depth: couplings on the longest input -> output path (the hidden
    states on it are one fewer); 1 for a graph without an output state."""
    d = depths(g)
    return max((d[s.name] for s in g.states if s.role == "output"), default=1)


def _has_weights(c: Coupling) -> bool:
    return any(op_weights(op) for op in c.ops)


def _identity_weight(shape) -> tuple[object, np.ndarray] | None:
    if len(shape) == 3:
        c = shape[0]
        return Conv(""), np.eye(c, dtype=np.float32).reshape(c, c, 1, 1)
    if len(shape) == 1:
        return Dense(""), np.eye(shape[0], dtype=np.float32)
    return None


def _is_identity(c: Coupling) -> bool:
    return all(isinstance(op, Identity) for op in c.ops)


def _learn_identity(g: Graph, c: Coupling, gain: float = 1.0) -> bool:
    """Give the identity skip c a learned map initialised to gain times the identity (a
    1x1 conv for a [C, H, W] state, a dense layer for a 1-D one); False, and c unchanged,
    for a state of another rank."""
    made = _identity_weight(g.shape_of(c.src))
    if made is None:
        return False
    op, w = made
    op.weight = g.fresh_name(f"{c.name}.weight")
    g.weights[op.weight] = w * np.float32(gain)
    c.ops = [op]
    return True


def requires(g: Graph, opts: CompileOptions) -> list[str]:
    errs = C.energy(g)
    if errs:
        return errs
    dg = nx.DiGraph((c.src, c.dst) for c in g.couplings if c.kind in MAIN_KINDS)
    if not nx.is_directed_acyclic_graph(dg):
        return ["its forward and residual couplings form a cycle"]
    return C.weight_data(g) if opts.skip_gain != 1.0 else []


def ensures(before: Graph, after: Graph, opts: CompileOptions) -> list[str]:
    errs = C.energy(after) + C.kept(before.states, after.states, "states")
    errs += C.kept(before.costs, after.costs, "costs")
    ends = lambda g: [(c.name, c.src, c.dst) for c in g.couplings]  # noqa: E731
    if ends(after) != ends(before):
        return errs + ["couplings were added, removed or rewired"]
    inputs = {i.name for i in after.inputs}
    for b, c in zip(before.couplings, after.couplings):
        if c.kind not in MAIN_KINDS and c != b:
            errs.append(f"coupling {c.name}: a {c.kind} coupling changed")
        elif c.kind == "residual" and len(c.ops) > 1 and _is_identity(c):
            errs.append(f"coupling {c.name}: an identity chain left uncollapsed")
        elif c.kind == "residual" and opts.skip_gain != 1.0 and c.src not in inputs \
                and not _has_weights(c):
            errs.append(f"coupling {c.name}: a skip without a weight under skip_gain")
    for s in after.states:
        kinds = [c.kind for c in after.inbound(s.name) if c.kind in MAIN_KINDS]
        if kinds and kinds.count("forward") != 1:
            errs.append(f"state {s.name}: {kinds.count('forward')} forward couplings in")
    return errs


def transform(g: Graph, opts: CompileOptions) -> Graph:
    if opts.identity_skip not in ("identity", "learned"):
        raise EpcError(f"bad identity skip {opts.identity_skip!r} (supported: identity, learned)")
    gain = float(opts.skip_gain)
    if not (np.isfinite(gain) and gain > 0):
        raise EpcError(f"bad skip gain {opts.skip_gain!r}: must be a positive number")
    g = g.copy()
    depth = depths(g)
    for s in g.states:
        inb = [(k, c) for k, c in enumerate(g.couplings)
               if c.dst == s.name and c.kind in MAIN_KINDS]
        if not inb:
            continue
        main = max(inb, key=lambda kc: (depth[kc[1].src], _has_weights(kc[1]), len(kc[1].ops),
                                        -kc[0]))[1]
        for _, c in inb:
            c.kind = "forward" if c is main else "residual"
            if c is main or not _is_identity(c):
                continue
            c.ops = [Identity()]
            if opts.identity_skip == "learned":
                _learn_identity(g, c)
    if gain != 1.0:
        inputs = {i.name for i in g.inputs}
        for c in g.couplings:
            if c.kind == "residual" and c.src not in inputs:
                _scale_skip(g, c, gain)
    return g


PASS = Pass("residual", transform, requires, ensures)
run = PASS.run


def unit_gain_skips(g: Graph) -> list[Coupling]:
    """The skips between two states still at gain 1: weightless identities, or learned
    maps equal to the identity `_identity_weight` starts them at (--identity-skip learned).
    After skip_gain G != 1 there are none. `epc compile` notes them (docs/findings.md, deep nets)."""
    inputs = {i.name for i in g.inputs}

    def gain_one(c: Coupling) -> bool:
        if _is_identity(c):
            return True
        made = _identity_weight(g.shape_of(c.src))
        return (made is not None and len(c.ops) == 1 and type(c.ops[0]) is type(made[0])
                and np.array_equal(g.weights[c.ops[0].weight], made[1]))
    return [c for c in g.couplings
            if c.kind == "residual" and c.src not in inputs and gain_one(c)]


def _scale_skip(g: Graph, c: Coupling, gain: float) -> None:
    """Multiply the skip coupling c's output by `gain` (see the module docstring)."""
    weighted = [op for op in c.ops if op_weights(op)]   # energy form: Conv, Dense, ...
    if not weighted:
        # an identity, or a chain that only moves data (a concatenated part's placement):
        # a learned map, G times the identity, in front of it
        rest = [] if _is_identity(c) else list(c.ops)
        if not _learn_identity(g, c, gain):
            raise EpcError(f"coupling {c.name}: --skip-gain needs a [C, H, W] or 1-D state "
                           f"to give the skip a weight, not {list(g.shape_of(c.src))}")
        c.ops = c.ops + rest
        return
    op = weighted[0]
    name = op.weight
    shared = any(name in op_weights(o).values() for d in g.couplings if d is not c
                 for o in d.ops)
    if shared:      # scale a copy: the other coupling keeps its weight
        op.weight = g.fresh_name(f"{c.name}.weight")
        g.weights[op.weight] = g.weights[name] * np.float32(gain)
    else:
        g.weights[name] = g.weights[name] * np.float32(gain)
