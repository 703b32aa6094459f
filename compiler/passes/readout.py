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

Requires: an energy-form graph; opts.readout. The heads have act identity.
Ensures:  readout=True on the output and tap states; feedback=False on every coupling
          into them; nothing else changes (with opts.readout False the pass is the identity).
"""
from __future__ import annotations

from ..errors import EpcError
from ..ir import Graph
from ..options import CompileOptions
from .manager import require_energy


def run(g: Graph, opts: CompileOptions) -> Graph:
    require_energy(g, "readout")
    g = g.copy()
    if not opts.readout:
        return g
    heads = [s for s in g.states if s.role in ("output", "tap")]
    for s in heads:
        if s.act.kind != "identity":
            raise EpcError(f"--readout: head {s.name} has activation {s.act.kind}; a readout "
                           f"is linear (the output layer of the source must have none)")
        s.readout = True
    names = {s.name for s in heads}
    for c in g.couplings:
        if c.dst in names:
            c.feedback = False
    return g
