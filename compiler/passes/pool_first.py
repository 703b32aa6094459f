"""pool_first: move each max-pool in front of the activation that feeds it (opt-in).

Runs with: options.pool_first (`--pool-first`), or, when it is None (not given), with
          --neuron bernoulli (below); off, the pass is the identity.
Requires: a canonical feedforward graph (after canonicalize: no BatchNorm, Identity,
          Dropout or output Softmax). Weights need only their shapes.
Ensures:  the same function, the same nodes (names, ops), inputs and outputs, in another
          order. Every `MaxPool` whose input is an `Act` node read by nothing else, and
          whose pre-activation comes from one state through single-input ops (no residual
          join, no bias that varies within a channel: to_energy has no coupling form for a
          max-pool of those), now reads that activation's input, and the activation
          follows the pool: act(maxpool(u)) instead of maxpool(act(u)); no such pair is
          left. Every activation epc lowers (ReLU, clip, hard sigmoid) is non-decreasing,
          and a non-decreasing function commutes with a max (padding is -inf, which no
          valid window selects).
The pass manager checks these conditions, except 'the same function' (tests/test_passes.py
compares the two graphs' values).

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
from . import conditions as C
from .manager import Pass


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
            shape = tuple(g.weights[n.op.weight].shape)     # data or a declaration
            if len(shape) > 1 and int(np.prod(shape[1:])) != 1:
                return False
        value = n.inputs[0]
    return True


def _movable(g: Graph, pool, by_name: dict):
    """The activation node a max-pool can move in front of, or None."""
    if not isinstance(pool.op, MaxPool):
        return None
    act = by_name.get(pool.inputs[0])
    if (act is None or not isinstance(act.op, Act) or g.uses(act.name) != 1
            or not _one_state_chain(g, act.inputs[0], by_name)):
        return None
    return act


# Bernoulli nets pool first unless told (--no-pool-first): with the pool after the
# activation, a stochastic phase takes the max of the window's noisy rate estimates (biased
# upward; the mean field takes the max of the means) and the winners jump from step to
# step. Pooling first, the max acts on drives: on the clamped input for the first conv
# (no noise at all), on a coupling's output deeper. conv_digits, 10 epochs, seed 0,
# 128/128 steps trace:4: 90.00% -> 92.50% (trace:8 90.83% -> 93.61%; the rate net 96.11%),
# and 1.7x faster per epoch (the pooled states are 4x smaller); conv1_digits, 64/32
# trace:8: 95.28% -> 95.00%, 3.4x faster (docs/stochep.md). Rate nets keep the pool after
# the activation (rate conv_digits pooled first: 94.72%).
def enabled(opts: CompileOptions) -> bool:
    if opts.pool_first is None:
        return opts.neuron == "bernoulli"
    return bool(opts.pool_first)


def requires(g: Graph, opts: CompileOptions) -> list[str]:
    return C.feedforward(g) or C.canonical(g)


def ensures(before: Graph, after: Graph, opts: CompileOptions) -> list[str]:
    errs = C.feedforward(after) + C.same_inputs(before, after)
    key = lambda g: sorted((n.name, repr(n.op)) for n in g.nodes)  # noqa: E731
    if key(after) != key(before) or after.outputs != before.outputs:
        errs.append("the nodes or outputs changed (the pass only reorders)")
    if enabled(opts):
        by_name = {n.name: n for n in after.nodes}
        errs += [f"node {n.name}: a max-pool left after activation {act.name}"
                 for n in after.nodes if (act := _movable(after, n, by_name)) is not None]
    return errs


def transform(g: Graph, opts: CompileOptions) -> Graph:
    g = g.copy()
    if not enabled(opts):
        return g
    by_name = {n.name: n for n in g.nodes}
    for i, pool in enumerate(g.nodes):
        act = _movable(g, pool, by_name)
        if act is None:
            continue
        # readers of the pool now read the activation, which reads the pool
        g.rewire(pool.name, act.name)
        j = g.nodes.index(act)
        pool.inputs, act.inputs = list(act.inputs), [pool.name]
        act.shape = pool.shape
        g.nodes[j], g.nodes[i] = pool, act
    return g


PASS = Pass("pool_first", transform, requires, ensures, enabled, "--pool-first")
run = PASS.run

__all__ = ["run", "PASS"]
