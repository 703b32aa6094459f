"""The IR verifier: structural checks on either form of a graph.

`verify(g)` raises EpcError listing every problem found: dangling names, duplicate names,
ops whose weights do not fit their inputs, couplings whose chain does not map the source
shape onto the destination shape, biases that do not broadcast, NaN/Inf weights, costs on
unknown states, and a schedule that misses a state, names an unknown one, or puts two
coupled states in the same colour class (their block update would not be exact).
"""
from __future__ import annotations

import math

import numpy as np

from . import ops as O
from .errors import EpcError
from .ir import (AVERAGINGS, COST_KINDS, COUPLING_KINDS, NEURON_MODELS, SAMPLINGS, STATE_ROLES,
                 Graph, WeightSpec, op_weights)


def _broadcasts(bshape, shape) -> bool:
    if len(bshape) > len(shape):
        return False
    return all(b in (1, s) for b, s in zip(bshape[::-1], tuple(shape)[::-1]))


def problems(g: Graph) -> list[str]:
    """All problems found, as messages naming the entity (empty list: the graph is valid)."""
    c = _Checks(g)
    c.inputs_and_weights()
    c.nodes()
    c.states()
    c.couplings()
    c.readouts()
    c.costs()
    if g.schedule is not None:
        c.schedule()
    return c.errs


class _Checks:
    """The checks of `problems`, one method per part of a graph; each appends messages."""

    def __init__(self, g: Graph):
        self.g = g
        self.errs: list[str] = []
        self.names: dict[str, str] = {}    # declared name -> what it is

    def declare(self, name: str, what: str) -> None:
        if name in self.names:
            self.errs.append(f"{what} {name}: name already used by a {self.names[name]}")
        self.names[name] = what

    def one_of(self, where: str, field: str, value, allowed) -> bool:
        """`value` of `field` is one of `allowed`; else a message listing them."""
        if value in allowed:
            return True
        self.errs.append(f"{where}: {field} {value!r} (supported: {', '.join(allowed)})")
        return False

    def op_ok(self, op, where: str) -> bool:
        missing = [w for w in op_weights(op).values() if w not in self.g.weights]
        if missing:
            self.errs.append(f"{where}: unknown weight {missing[0]}")
            return False
        return True

    def inputs_and_weights(self) -> None:
        g, errs = self.g, self.errs
        for i in g.inputs:
            self.declare(i.name, "input")
            if any(int(d) <= 0 for d in i.shape):
                errs.append(f"input {i.name}: bad shape {list(i.shape)}")
        if not g.inputs:
            errs.append("graph has no input")
        for name, w in g.weights.items():
            if isinstance(w, np.ndarray) and np.issubdtype(w.dtype, np.floating) \
                    and not np.all(np.isfinite(w)):
                errs.append(f"weight {name}: contains NaN or Inf")
        for name in g.weight_names():
            if name not in g.weights:
                errs.append(f"weight {name}: referenced but not declared")

    # ---- feedforward form
    def nodes(self) -> None:
        g, errs, names = self.g, self.errs, self.names
        for n in g.nodes:
            for x in n.inputs:
                if x not in names:
                    errs.append(f"node {n.name}: input {x} is not defined before it")
            self.declare(n.name, "node")
            many = type(n.op) in O.RULES and O.rule(n.op).many_inputs
            if len(n.inputs) != 1 and not (many and n.inputs):
                errs.append(f"node {n.name}: {n.op.kind} takes "
                            f"{'one or more inputs' if many else 'one input'}, "
                            f"given {len(n.inputs)}")
                continue
            if all(x in names for x in n.inputs) and self.op_ok(n.op, f"node {n.name}"):
                try:
                    shp = O.out_shape(n.op, [g.shape_of(x) for x in n.inputs], g.weights)
                    if tuple(shp) != tuple(n.shape):
                        errs.append(f"node {n.name}: declared shape {list(n.shape)}, "
                                    f"op gives {list(shp)}")
                except EpcError as e:
                    errs.append(f"node {n.name}: {e}")
        for o in g.outputs:
            if o not in names:
                errs.append(f"output {o}: not defined")

    # ---- energy form
    def states(self) -> None:
        g, errs = self.g, self.errs
        for s in g.states:
            self.declare(s.name, "state")
            self.one_of(f"state {s.name}", "role", s.role, STATE_ROLES)
            self.one_of(f"state {s.name}", "neuron", s.neuron, NEURON_MODELS)
            if s.neuron == "bernoulli" and not s.act.probability:
                errs.append(f"state {s.name}: a bernoulli neuron needs an activation within "
                            f"[0, 1] (its firing probability), has {s.act.kind}")
            elif s.neuron == "bernoulli" and s.role == "teacher":
                errs.append(f"state {s.name}: a teacher state is computed feedforward, "
                            f"never bernoulli")
            if s.bias:
                if s.bias not in g.weights:
                    errs.append(f"state {s.name}: unknown bias weight {s.bias}")
                elif not _broadcasts(tuple(g.weights[s.bias].shape), s.shape):
                    errs.append(f"state {s.name}: bias {s.bias} "
                                f"{list(g.weights[s.bias].shape)} does not broadcast to "
                                f"{list(s.shape)}")

    def couplings(self) -> None:
        g, errs = self.g, self.errs
        state_names = {s.name for s in g.states}
        input_names = {i.name for i in g.inputs}
        for c in g.couplings:
            self.declare(c.name, "coupling")
            self.one_of(f"coupling {c.name}", "kind", c.kind, COUPLING_KINDS)
            if c.src not in state_names | input_names:
                errs.append(f"coupling {c.name}: source {c.src} is not a state or input")
                continue
            if c.dst not in state_names:
                errs.append(f"coupling {c.name}: destination {c.dst} is not a state")
                continue
            if c.feedback and c.src in input_names:
                errs.append(f"coupling {c.name}: feedback into clamped input {c.src}")
            gain = c.feedback_gain
            if not (isinstance(gain, (int, float)) and not isinstance(gain, bool)
                    and math.isfinite(gain) and gain > 0):
                errs.append(f"coupling {c.name}: feedback_gain must be a positive number, "
                            f"got {gain!r}")
            elif gain != 1.0 and not c.feedback:
                errs.append(f"coupling {c.name}: feedback_gain {gain:g} on a coupling without "
                            f"feedback")
            if not c.ops:
                errs.append(f"coupling {c.name}: empty op chain (use identity)")
            self.chain(c)

    def chain(self, c) -> None:
        """A coupling's ops are linear, their weights exist, and the chain maps the source
        shape onto the destination's."""
        g, errs = self.g, self.errs
        shape = g.shape_of(c.src)
        for op in c.ops:
            if not op.linear:
                errs.append(f"coupling {c.name}: op {op.kind} is not linear")
                return
            if not self.op_ok(op, f"coupling {c.name}"):
                return
            try:
                shape = O.out_shape(op, [shape], g.weights)
            except EpcError as e:
                errs.append(f"coupling {c.name}: {e}")
                return
        if tuple(shape) != tuple(g.shape_of(c.dst)):
            errs.append(f"coupling {c.name}: chain maps {list(g.shape_of(c.src))} to "
                        f"{list(shape)}, but {c.dst} is {list(g.shape_of(c.dst))}")

    def readouts(self) -> None:
        g, errs = self.g, self.errs
        readouts = {s.name for s in g.states if s.readout}
        for s in g.states:
            if not s.readout:
                continue
            if s.role not in ("output", "tap"):
                errs.append(f"state {s.name}: a readout must be an output or tap state, "
                            f"not {s.role}")
            if s.act.kind != "identity":
                errs.append(f"state {s.name}: a readout is linear (act identity), "
                            f"not {s.act.kind}")
        for c in g.couplings:
            if c.src in readouts:
                errs.append(f"coupling {c.name}: readout state {c.src} feeds {c.dst} (a "
                            f"readout is outside the energy and drives nothing)")
            if c.dst in readouts and (c.feedback or c.src in readouts):
                errs.append(f"coupling {c.name}: into readout {c.dst} it must have no "
                            f"feedback and come from a settled state or an input")

    def costs(self) -> None:
        g, errs = self.g, self.errs
        state_names = {s.name for s in g.states}
        for c in g.costs:
            if c.state not in state_names:
                errs.append(f"cost {c.name}: unknown state {c.state}")
            self.one_of(f"cost {c.name}", "kind", c.kind, COST_KINDS)
            if c.target != "label" and c.target not in state_names:
                errs.append(f"cost {c.name}: target {c.target} is neither 'label' nor a state")
        if g.teacher and g.teacher.output not in state_names:
            errs.append(f"teacher {g.teacher.name}: output {g.teacher.output} is not a state")
        if g.states and not g.nodes:
            outs = [s.name for s in g.states if s.role == "output"]
            if len(outs) != 1:
                errs.append(f"energy graph needs exactly one output state, has "
                            f"{outs or 'none'}")

    def schedule(self) -> None:
        g, errs, s = self.g, self.errs, self.g.schedule
        state_names = {st.name for st in g.states}
        if s.mode not in ("colour", "sync"):
            errs.append(f"schedule: mode {s.mode!r} (supported: colour, sync)")
        if s.max_sweeps < 1 or s.nudge_sweeps < 1:
            errs.append("schedule: sweep caps must be at least 1")
        if not s.tol >= 0:
            errs.append("schedule: tolerance must be >= 0")
        colour: dict[str, int] = {}
        for k, cls in enumerate(s.classes):
            for n in cls:
                if n not in state_names:
                    errs.append(f"schedule: class {k} names unknown state {n}")
                elif n in colour:
                    errs.append(f"schedule: state {n} is in classes {colour[n]} and {k}")
                else:
                    colour[n] = k
        for st in g.settled_states():
            if st.name not in colour:
                errs.append(f"schedule: state {st.name} is in no colour class")
        for c in g.couplings:
            if c.src in colour and c.dst in colour and colour[c.src] == colour[c.dst] \
                    and s.mode == "colour":
                errs.append(f"schedule: coupled states {c.src} and {c.dst} (coupling "
                            f"{c.name}) share colour class {colour[c.src]}")
        self.spiking()

    def spiking(self) -> None:
        """A graph with bernoulli states has the schedule's spiking part, with valid time
        steps, averaging and sampling; a rate graph has none."""
        g, errs, sp = self.g, self.errs, self.g.schedule.spiking
        if not g.stochastic:
            if sp is not None:
                errs.append("schedule: spiking attributes (time_steps, ...) but no bernoulli "
                            "state")
            return
        if sp is None:
            errs.append("schedule: bernoulli states but no time_steps, nudge_time_steps, "
                        "averaging, tau, sampling")
            return
        for k in ("time_steps", "nudge_time_steps", "tau"):
            v = getattr(sp, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                errs.append(f"schedule: {k}={v} (must be an integer >= 1)")
        self.one_of("schedule", "averaging", sp.averaging, AVERAGINGS)
        self.one_of("schedule", "sampling", sp.sampling, SAMPLINGS)


def verify(g: Graph) -> Graph:
    errs = problems(g)
    if errs:
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        detail = "; ".join(errs[:8])
        raise EpcError(f"invalid IR in graph {g.name}: {detail}{more}")
    return g


__all__ = ["verify", "problems", "WeightSpec"]
