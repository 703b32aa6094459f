"""symmetrize: give every coupling between two states its tied transpose (feedback).

In the energy form a coupling <s_dst, L(s_src)> drives both ends: s_dst sees L(s_src) and
s_src sees L^T(s_dst). `feedback=True` records that the source end is driven; a clamped
input is never driven, and teacher couplings are computed feedforward only.

With `opts.feedback == False` (`--no-feedback`) the pass does not run: the network then
settles as a feedforward-only chain (each state sees only its inputs), which is useful for
debugging (a single sweep in topological order reproduces the source model) but is not EP.

Runs with: options.feedback (the default; `--no-feedback` turns it off).
Requires:  an energy-form graph.
Ensures:   feedback is True on every coupling whose source is a state and whose kind is not
           'teacher'; nothing else changes (the other couplings keep their feedback).
The pass manager checks these conditions.
"""
from __future__ import annotations

import dataclasses

from ..ir import Graph
from ..options import CompileOptions
from . import conditions as C
from .manager import Pass


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
    for b, a in zip(before.couplings, after.couplings):
        want = b.feedback or (enabled(opts) and _driven(states, b))
        if dataclasses.replace(a, feedback=b.feedback) != b or a.feedback != want:
            errs.append(f"coupling {a.name}: expected only feedback={want} to change")
    return errs


def transform(g: Graph, opts: CompileOptions) -> Graph:
    g = g.copy()
    if not opts.feedback:
        return g
    states = {s.name for s in g.states}
    for c in g.couplings:
        if _driven(states, c):
            c.feedback = True
    return g


PASS = Pass("symmetrize", transform, requires, ensures, enabled, "--feedback")
run = PASS.run
