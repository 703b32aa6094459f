"""symmetrize: give every coupling between two states its tied transpose (feedback).

In the energy form a coupling <s_dst, L(s_src)> drives both ends: s_dst sees L(s_src) and
s_src sees L^T(s_dst). `feedback=True` records that the source end is driven; a clamped
input is never driven, and teacher couplings are computed feedforward only.

With `opts.feedback == False` the pass is the identity: the network then settles as a
feedforward-only chain (each state sees only its inputs), which is useful for debugging
(a single sweep in topological order reproduces the source model) but is not EP.

Requires: an energy-form graph.
Ensures:  feedback is True on every coupling whose source is a state and whose kind is not
          'teacher' (when opts.feedback); other couplings are unchanged.
"""
from __future__ import annotations

from ..ir import Graph
from ..options import CompileOptions
from .manager import require_energy


def run(g: Graph, opts: CompileOptions) -> Graph:
    require_energy(g, "symmetrize")
    g = g.copy()
    if not opts.feedback:
        return g
    states = {s.name for s in g.states}
    for c in g.couplings:
        if c.src in states and c.kind != "teacher":
            c.feedback = True
    return g
