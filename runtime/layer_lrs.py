"""Per-layer learning rates (`epc train --layer-lrs none|auto|F1,F2,...`).

A "layer" is a depth level of the compiled graph: level k holds every coupling whose
destination state lies k couplings from the input on the longest path
(compiler/passes/residual.py `depths`), with that state's bias. A chain (MLP, VGG) has one
coupling per level; a skip coupling joins the level of the state it drives. Each weight's
rate is the run's rate (`--lr`, under its schedule) times its level's factor:

    none       every factor 1 (one rate for the whole network)
    F1,...,FL  the factors of levels 1 (next to the input) to L (the output), given
    auto       factors derived from the graph by AUTO_RULE below

Weights outside the levels (tap heads, whose states hang off the main path) take the
factor of the level their coupling leaves from.

The EP codes that use per-layer rates (Laborieux et al. 2021's `--lrs`, the
energy-based-learning library's deep Hopfield nets) give the layers next to the input
the largest rates and shrink them toward the output, under plain SGD, where the rate also
has to make up for an EP signal that weakens with its distance from the output.
"""
from __future__ import annotations

import math

import numpy as np

from epc.compiler import flags
from epc.compiler.errors import EpcError
from epc.compiler.ir import Conv, Dense, Graph, op_weights
from epc.compiler.passes.residual import depths, output_depth


def levels(g: Graph) -> dict[str, int]:
    """The depth level (1 .. L) of every weight the graph's couplings and states hold."""
    d = depths(g)
    states = {s.name for s in g.states}
    out: dict[str, int] = {}
    for c in g.couplings:
        # a coupling into a state of the main path sits at that state's depth; a tap head or
        # a teacher (not on the main path) at the depth it leaves from, plus one
        lvl = d[c.dst] if c.dst in d and c.dst in states and d[c.dst] > 0 else \
            d.get(c.src, 0) + 1
        for op in c.ops:
            for w in op_weights(op).values():
                out.setdefault(w, max(lvl, 1))
    for s in g.states:
        if s.bias:
            out.setdefault(s.bias, max(d.get(s.name, 1), 1))
    for n in g.nodes:               # input-side computations: the first level
        for w in op_weights(n.op).values():
            out.setdefault(w, 1)
    return out


def fan_ins(g: Graph) -> dict[int, int]:
    """Per level: how many inputs each unit of its states sums (a dense weight [out, in]
    gives in, a convolution [O, I, kh, kw] I*kh*kw), over the level's couplings into states."""
    d = depths(g)
    main = {s.name for s in g.states if s.role in ("hidden", "output")}
    out: dict[int, int] = {}
    for c in g.couplings:
        if c.dst not in main or c.kind == "teacher" or d.get(c.dst, 0) < 1:
            continue
        for op in c.ops:
            for role, w in op_weights(op).items():
                shape = g.weights[w].shape
                if isinstance(op, (Dense, Conv)) and len(shape) >= 2:
                    out[d[c.dst]] = out.get(d[c.dst], 0) + int(np.prod(shape[1:]))
    return out


def depth(g: Graph) -> int:
    """L: the output states' depth (the number of levels the factors are given for)."""
    return output_depth(g)


# auto: the default --lr was tuned on the digits MLPs, whose units sum at most 256 inputs
# (docs/findings.md). Under Adam every weight moves by about the rate a step whatever its
# gradient's size, so a dense unit's drive moves by about rate * sqrt(fan-in) (independent
# signs): a dense level whose units sum more inputs than that gets its rate scaled by
# sqrt(256 / fan-in), which keeps the drive's step what the tuned rate gave. Measured
# (docs/training.md, seed 0): Fashion-MNIST 784-256-10, 15 epochs, 89.22% against 88.66%
# at one rate. Convolutions keep the rate: scaled the same way (by their in-channels x
# kernel) the 6-conv VGG of the depth ladder underfits, 92.78% against 96.11% on digits.
AUTO_FAN_IN = 256


def _dense_levels(g: Graph) -> set[int]:
    """The levels whose weighted couplings into states are all dense."""
    d = depths(g)
    main = {s.name for s in g.states if s.role in ("hidden", "output")}
    kinds: dict[int, set] = {}
    for c in g.couplings:
        if c.dst in main and c.kind != "teacher" and d.get(c.dst, 0) >= 1:
            for op in c.ops:
                if op_weights(op) and isinstance(op, (Dense, Conv)):
                    kinds.setdefault(d[c.dst], set()).add(type(op))
    return {k for k, v in kinds.items() if v == {Dense}}


def auto_factors(g: Graph) -> tuple[float, ...]:
    """The factors `auto` gives graph g (a function of its structure alone: which levels
    are dense, and the fan-in of their units)."""
    f, dense = fan_ins(g), _dense_levels(g)
    return tuple(min(1.0, math.sqrt(AUTO_FAN_IN / f[k])) if k in dense and f.get(k) else 1.0
                 for k in range(1, depth(g) + 1))


def factors(g: Graph, spec, learnable) -> tuple[dict[str, float], tuple[float, ...]]:
    """(weight -> factor for the `learnable` weights, the per-level factors) of option value
    `spec` on graph g. A list of factors whose length is not the graph's depth is an
    EpcError naming the levels."""
    v = flags.parse_layer_lrs(spec)
    L = depth(g)
    if v == "none":
        per = (1.0,) * L
    elif v == "auto":
        per = auto_factors(g)
    else:
        per = v
        if len(per) != L:
            d = depths(g)
            by = {}
            for s in g.states:
                if s.role in ("hidden", "output") and 0 < d.get(s.name, 0) <= L:
                    by.setdefault(d[s.name], s.name)
            named = ", ".join(f"{k}: {by.get(k, '?')}" for k in range(1, L + 1))
            raise EpcError(f"bad --layer-lrs {flags.check('layer_lrs', spec)}: {len(per)} factor"
                           f"{'s' if len(per) != 1 else ''} for a graph of {L} level"
                           f"{'s' if L != 1 else ''} of couplings ({named}): give {L}")
    lv = levels(g)
    return {w: per[min(lv.get(w, 1), L) - 1] for w in learnable}, tuple(per)
