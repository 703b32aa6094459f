"""readout: take the output (and tap) heads out of the energy (`epc compile --readout`).

In the default energy form the output state is settled like any other: it sits in Phi,
and its tied transpose feeds back into the last hidden state (which then sees W^T W h as
well as the nudge). With a readout (Laborieux et al. 2021, used there with cross-entropy),
the head is a plain linear function of the state(s) feeding it, o = L(h) + b, evaluated
but not part of the energy:

* free phase: the hidden states settle without the head (no W^T o feedback);
* nudged phase: the cost beta * C(o) enters the energy as a function of h, so h is nudged
  by -beta * L^T(dC/do), and o itself is never nudged;
* learning: the head's weights get dC/dtheta at the nudged states (averaged over +-beta),
  every other weight the usual EP estimate.

Which heads: the output state and every tap state (their couplings from the network into
the head lose their feedback). Targets: the torch runtime; the neuromorphic core has no
readout unit and refuses such graphs.

Runs with: options.readout (`--readout`); without it the pass does not run.
Requires: an energy-form graph whose heads (output and tap states) have act identity.
Ensures:  readout=True on the output and tap states; feedback=False on every coupling
          into them; nothing else changes.
The pass manager checks these conditions.
"""
from __future__ import annotations

import dataclasses

from ..ir import Graph
from ..options import CompileOptions
from . import conditions as C
from .manager import Pass

HEADS = ("output", "tap")


def enabled(opts: CompileOptions) -> bool:
    return bool(opts.readout)


def requires(g: Graph, opts: CompileOptions) -> list[str]:
    errs = C.energy(g)
    if not errs and enabled(opts):
        errs += [f"--readout: head {s.name} has activation {s.act.kind}; a readout is linear "
                 f"(the output layer of the source must have none)"
                 for s in g.states if s.role in HEADS and s.act.kind != "identity"]
    return errs


def ensures(before: Graph, after: Graph, opts: CompileOptions) -> list[str]:
    errs = C.energy(after) + C.kept(before.costs, after.costs, "costs")
    on = enabled(opts)
    if len(after.states) != len(before.states) or \
            len(after.couplings) != len(before.couplings):
        return errs + ["states or couplings were added or removed"]
    heads = {s.name for s in before.states if s.role in HEADS}
    for b, a in zip(before.states, after.states):
        want = b.readout or (on and b.name in heads)
        if dataclasses.replace(a, readout=b.readout) != b or a.readout != want:
            errs.append(f"state {a.name}: expected only readout={want} to change")
    for b, a in zip(before.couplings, after.couplings):
        want = b.feedback and not (on and b.dst in heads)
        if dataclasses.replace(a, feedback=b.feedback) != b or a.feedback != want:
            errs.append(f"coupling {a.name}: expected only feedback={want} to change")
    return errs


def transform(g: Graph, opts: CompileOptions) -> Graph:
    g = g.copy()
    if not opts.readout:
        return g
    heads = [s for s in g.states if s.role in HEADS]
    for s in heads:
        s.readout = True
    names = {s.name for s in heads}
    for c in g.couplings:
        if c.dst in names:
            c.feedback = False
    return g


PASS = Pass("readout", transform, requires, ensures, enabled, "--readout")
run = PASS.run
