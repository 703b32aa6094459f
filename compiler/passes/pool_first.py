"""pool_first: move each max-pool in front of the activation that feeds it (opt-in).

Requires: a canonical feedforward graph (after canonicalize).
Ensures:  the same function. With `options.pool_first`, every `MaxPool` whose input is an
          `Act` node read by nothing else, and whose pre-activation comes from one state
          through single-input ops (no residual join, no bias that varies within a
          channel: to_energy has no coupling form for a max-pool of those), now reads that
          activation's input, and the activation follows the pool: act(maxpool(u))
          instead of maxpool(act(u)). Every activation epc lowers (ReLU, clip, hard
          sigmoid) is non-decreasing, and a non-decreasing function commutes with a max
          (padding is -inf, which no valid window selects). Without the option the graph
          is copied unchanged.

Why: to_energy makes a state of every activation. With the pool after the activation, the
state is the full-resolution map and the max-pool sits inside the coupling to the next
state, so which element of a window wins depends on a state that settles; feedback into the
winner can make the winner change back and forth (a few % of digits samples cycled until the
engine froze the selections). With the pool first, the state is the pooled map (4x smaller
for 2x2 pools); the first layer's pool acts on the clamped input only (a constant), and in
deeper layers the pool selects among a coupling's outputs rather than among a state's
elements. This is the max-pool placement of Laborieux et al. (2021), P(W * s).
"""
from __future__ import annotations

import numpy as np

from ..ir import Act, Bias, Graph, MaxPool
from ..options import CompileOptions


def _one_state_chain(g: Graph, value: str, by_name: dict) -> bool:
    """`value` is reached from one state (an activation or an input) through single-input
    ops, with biases constant over each channel."""
    while value in by_name:
        n = by_name[value]
        if isinstance(n.op, Act):
            return True
        if len(n.inputs) != 1:
            return False
        if isinstance(n.op, Bias):
            shape = np.shape(g.weights[n.op.weight])
            if len(shape) > 1 and int(np.prod(shape[1:])) != 1:
                return False
        value = n.inputs[0]
    return True


def run(g: Graph, opts: CompileOptions) -> Graph:
    g = g.copy()
    if not opts.pool_first:
        return g
    by_name = {n.name: n for n in g.nodes}
    for i, pool in enumerate(g.nodes):
        if not isinstance(pool.op, MaxPool):
            continue
        act = by_name.get(pool.inputs[0])
        if (act is None or not isinstance(act.op, Act) or g.uses(act.name) != 1
                or not _one_state_chain(g, act.inputs[0], by_name)):
            continue
        # readers of the pool now read the activation, which reads the pool
        g.rewire(pool.name, act.name)
        j = g.nodes.index(act)
        pool.inputs, act.inputs = list(act.inputs), [pool.name]
        act.shape = pool.shape
        g.nodes[j], g.nodes[i] = pool, act
    return g


__all__ = ["run"]
