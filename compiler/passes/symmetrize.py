"""symmetrize: give every coupling between two states its tied transpose (feedback).

In the energy form a coupling <s_dst, L(s_src)> drives both ends: s_dst sees L(s_src) and
s_src sees L^T(s_dst). `feedback=True` records that the source end is driven; a clamped
input is never driven, and teacher couplings are computed feedforward only.

With `opts.feedback == False` (`--no-feedback`) the pass does not run: the network then
settles as a feedforward-only chain (each state sees only its inputs), which is useful for
debugging (a single sweep in topological order reproduces the source model) but is not EP.

Feedback regulation (`options.feedback_gain` r != 1; `regulation_ratio` resolves 'auto'):
the feedback of a coupling from depth d_src to depth d_dst (longest coupling path from
the inputs) drives its source at gain r ** (d_dst - d_src), so a plain chain gets r on
every coupling and a skip over two layers r^2. Gains derived from a depth this way agree
around every loop, which is what makes the regulated settling the gradient flow of an
energy in rescaled states (runtime: Engine.feedback_scales) and EP's estimate exact once
corrected for them (runtime/learn.py). Why: with tied feedback at gain 1 a deep chain's
energy turns non-convex as its weights grow, the free phase settles slowly into saturated,
input-independent fixed points and EP's estimate at training beta falls apart with depth;
small gains keep the settling a fast contraction close to the feedforward pass.

Runs with: options.feedback (the default; `--no-feedback` turns it off).
Requires:  an energy-form graph.
Ensures:   feedback is True on every coupling whose source is a state and whose kind is not
           'teacher'; with a ratio r != 1 those couplings carry feedback_gain
           r ** (depth(dst) - depth(src)) (tap couplings, added later, keep 1); nothing else
           changes (the other couplings keep their feedback).
The pass manager checks these conditions.
"""
from __future__ import annotations

import dataclasses

from ..ir import Conv, Graph
from ..options import CompileOptions
from . import conditions as C
from .manager import Pass
from .residual import depths, output_depth

# 'auto': the feedback gain per level of depth, by the number of hidden states on the
# longest path. Measured on digits (seed 0; python -m bench.depth, docs/data/depth_digits.json):
# - MLPs of 256 units, 30 epochs: one hidden layer learns best with symmetric feedback
#   (98.61% against 98.33% at 0.25); from two hidden layers on, gain 1 settles slowly and
#   learns worse or collapses (2: 96.67%, 3: 95.56%, 5 and 8: one class) where 0.1 reaches
#   backprop (98.33, 98.06-98.33, 98.06-98.33, 97.78-98.06%) in a fraction of the sweeps.
#   10 epochs (bench.depth): 3 hidden 98.06% at 0.1 / 96.94% at 1, 5 hidden 98.06 / 79.17%,
#   8 hidden 96.11 / 16.94% (backprop 98.33, 98.33, 96.67%).
# - Convolutions between states, 10 epochs: two (vgg2: 32,32,M) learn better symmetric
#   (98.89% against 97.50% at 0.1; backprop 98.89%), four (vgg4) better regulated (98.33%
#   against 97.50%, 9% of free phases at the cap; backprop 98.33%), and a stem with two
#   identity-skip blocks (5 hidden states) collapses at gain 1 (8.06%) and learns at 0.1
#   (96.67%). So a graph whose states are coupled by convolutions stays symmetric up to two
#   hidden states (conv_digits is one); three is not measured and counts as deep.
AUTO_MAX_SYMMETRIC = 1        # dense graphs: at most this many hidden layers stay symmetric
AUTO_MAX_SYMMETRIC_CONV = 2   # graphs with a convolution between two states
AUTO_RATIO = 0.1


def conv_between_states(g: Graph) -> bool:
    """Some coupling between two states applies a convolution."""
    states = {s.name for s in g.states}
    return any(c.src in states and any(isinstance(op, Conv) for op in c.ops)
               for c in g.couplings)


def regulation_ratio(g: Graph, opts: CompileOptions) -> float:
    """The per-level feedback gain r that opts.feedback_gain asks for on graph g."""
    if opts.feedback_gain != "auto":
        return float(opts.feedback_gain)
    if opts.target == "neuromorphic":
        # the core applies tied feedback at gain 1 (targets/neuromorphic/quantize.py refuses
        # other gains): there the recipe is symmetric feedback at any depth
        return 1.0
    if opts.readout:
        # the readout pass takes the head's coupling out of the energy, and the gains'
        # rescaled energy is anchored at the output state (Engine.feedback_scales): not
        # combined (yet), so auto keeps symmetric feedback there
        return 1.0
    if opts.neuron == "bernoulli":
        # stochastic neurons keep symmetric feedback: the regulated nudge (beta * r^k)
        # sinks below their sampling noise in the first layers, and the gains' correction
        # (1 / r^k) then scales up noise. Measured on mlp3_digits (docs/stochep.md): at
        # initialisation (K = 4, 128/128 steps) the first coupling's mean estimate has
        # cosine 0.95 at gain 1, 0.05 at 0.1 (64/64: 0.07 at 0.3); trained 10 epochs
        # (128/128, trace:4) 91.9% at gain 1, 77.2% at 0.5 (rate nets: 94.7% / 98.1%)
        return 1.0
    # hidden states on the longest input -> output path
    most = AUTO_MAX_SYMMETRIC_CONV if conv_between_states(g) else AUTO_MAX_SYMMETRIC
    return 1.0 if output_depth(g) - 1 <= most else AUTO_RATIO


def _gains(g: Graph, opts: CompileOptions) -> dict[str, float]:
    """The feedback gain of every coupling the pass drives (all 1 without regulation)."""
    states = {s.name for s in g.states}
    r = regulation_ratio(g, opts)
    d = depths(g) if r != 1.0 else {}
    return {c.name: (float(r ** max(d[c.dst] - d[c.src], 1)) if r != 1.0 else 1.0)
            for c in g.couplings if _driven(states, c)}


def _driven(states: set[str], c) -> bool:
    return c.kind != "teacher" and c.src in states


def enabled(opts: CompileOptions) -> bool:
    return bool(opts.feedback)


def requires(g: Graph, opts: CompileOptions) -> list[str]:
    return C.energy(g)


def ensures(before: Graph, after: Graph, opts: CompileOptions) -> list[str]:
    errs = C.energy(after) + C.kept(before.states, after.states, "states")
    errs += C.kept(before.costs, after.costs, "costs")
    if len(after.couplings) != len(before.couplings):
        return errs + ["couplings were added or removed"]
    states = {s.name for s in before.states}
    gains = _gains(before, opts) if enabled(opts) else {}
    for b, a in zip(before.couplings, after.couplings):
        want = b.feedback or (enabled(opts) and _driven(states, b))
        gain = gains.get(b.name, b.feedback_gain)
        if (dataclasses.replace(a, feedback=b.feedback, feedback_gain=b.feedback_gain) != b
                or a.feedback != want or a.feedback_gain != gain):
            errs.append(f"coupling {a.name}: expected only feedback={want} and "
                        f"feedback_gain={gain:g} to change")
    return errs


def transform(g: Graph, opts: CompileOptions) -> Graph:
    g = g.copy()
    if not opts.feedback:
        return g
    gains = _gains(g, opts)
    for c in g.couplings:
        if c.name in gains:
            c.feedback = True
            c.feedback_gain = gains[c.name]
    return g


PASS = Pass("symmetrize", transform, requires, ensures, enabled, "--feedback")
run = PASS.run
