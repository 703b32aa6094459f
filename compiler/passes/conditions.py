"""Conditions the passes' `requires` and `ensures` share: each returns a list of problems
(an empty list: the condition holds), worded to follow 'graph NAME: PASS: '."""
from __future__ import annotations

from ..ir import BatchNorm, Dropout, Graph, Identity, Softmax, WeightSpec


def feedforward(g: Graph) -> list[str]:
    if g.states or g.couplings or g.costs or g.schedule or g.teacher:
        return ["needs a feedforward graph, this one is already in energy form"]
    return []


def energy(g: Graph) -> list[str]:
    if not g.is_energy:
        return ["needs an energy-form graph (run to_energy first), this one is feedforward"]
    return []


def canonical(g: Graph) -> list[str]:
    """What canonicalize removes is gone: BatchNorm, Identity, Dropout, an output Softmax."""
    out = []
    for n in g.nodes:
        if isinstance(n.op, (BatchNorm, Identity, Dropout)) or (
                isinstance(n.op, Softmax) and n.name in g.outputs
                and g.uses(n.name) == g.outputs.count(n.name)):
            out.append(f"node {n.name} ({n.op.kind}) is not canonical (run canonicalize first)")
    return out


def weight_data(g: Graph, names=None) -> list[str]:
    """Every weight (or every one in `names`) holds data, not just a declaration."""
    names = g.weights if names is None else names
    return [f"weight {n} is declared without data (give it in the IR text as `= seeded(N)` "
            f"or a literal tensor)" for n in names
            if isinstance(g.weights.get(n), WeightSpec)]


def one_output_state(g: Graph) -> list[str]:
    outs = [s.name for s in g.states if s.role == "output"]
    if len(outs) != 1:
        return [f"needs exactly one output state, has {', '.join(outs) or 'none'}"]
    return []


def same_inputs(before: Graph, after: Graph) -> list[str]:
    if [(i.name, tuple(i.shape)) for i in before.inputs] != \
            [(i.name, tuple(i.shape)) for i in after.inputs]:
        return ["the inputs changed"]
    return []


def kept(before: list, after: list, what: str) -> list[str]:
    """`after` starts with the entities of `before`, unchanged (a pass only appended)."""
    if after[:len(before)] != before:
        return [f"the existing {what} changed (this pass only adds {what})"]
    return []
