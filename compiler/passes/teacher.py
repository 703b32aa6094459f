"""teacher: attach a frozen teacher network for knowledge distillation.

The teacher is a feedforward model (opts.teacher_graph, set by the driver: for
opts.teacher == 'source' the source model itself, else the model loaded from the path in
opts.teacher). It is converted like the student (canonicalize + to_energy) and merged into
the graph as a frozen, feedforward-only subnetwork: the runtime computes its states once
per input in topological order and never settles or trains them.

Runs with: options.teacher (`--teacher source` or `--teacher FILE`); without it the pass
          does not run.
Requires: an energy-form student graph with one output state and no teacher yet;
          opts.teacher_graph a feedforward graph with as many inputs of the same shapes as
          the student and an output of the student output's shape.
Ensures:  the student's states and couplings unchanged, followed by the teacher's:
          * every teacher state is added as 'teacher.<name>', role 'teacher', neuron 'rate',
            act = source_act (the source model's own nonlinearity, unbounded where the
            source's is), so a feedforward pass of the teacher states computes exactly the
            teacher model;
          * every teacher coupling as 'teacher.<name>', kind 'teacher', feedback False, with
            teacher inputs mapped (by position) onto the student's inputs;
          * teacher weights copied as 'teacher.<name>' (never shared with the student);
          * Teacher(name 'teacher', source=opts.teacher, output='teacher.<out>',
            temperature=opts.teacher_temperature, mix=opts.teacher_mix);
          * the label cost on the output state gets weight (1 - mix) times its weight, and
            Cost 'distill' (kind 'kl', target the teacher output, weight mix, temperature T)
            is added on the student output.
The pass manager checks these conditions, except that the teacher computes the teacher
model (tests/test_passes.py runs both).
"""
from __future__ import annotations

import copy
import dataclasses

from ..errors import EpcError
from ..ir import Cost, Graph, Teacher, op_weights
from ..options import CompileOptions
from . import canonicalize, to_energy
from . import conditions as C
from .manager import Pass


def _teacher_energy(tg: Graph, opts: CompileOptions) -> Graph:
    if tg.states or not tg.nodes:
        raise EpcError(f"--teacher {opts.teacher}: the teacher must be a feedforward model "
                       f"(ONNX or PyTorch), not a compiled graph")
    topts = copy.copy(opts)
    topts.neuron = "rate"
    topts.teacher_graph = None
    try:
        return to_energy.run(canonicalize.run(tg, topts), topts)
    except EpcError as e:
        raise EpcError(f"--teacher {opts.teacher}: {e}")


def enabled(opts: CompileOptions) -> bool:
    return opts.teacher is not None


def requires(g: Graph, opts: CompileOptions) -> list[str]:
    errs = C.energy(g) or C.one_output_state(g)
    if not errs and g.teacher is not None:
        errs.append(f"already has teacher {g.teacher.name}")
    if not errs and enabled(opts) and not isinstance(opts.teacher_graph, Graph):
        errs.append(f"--teacher {opts.teacher}: no teacher model was loaded "
                    f"(CompileOptions.teacher_graph is not set)")
    return errs


def ensures(before: Graph, after: Graph, opts: CompileOptions) -> list[str]:
    errs = C.energy(after) + C.kept(before.states, after.states, "states")
    errs += C.kept(before.couplings, after.couplings, "couplings")
    if errs or not enabled(opts):
        return errs
    t = after.teacher
    states = after.states[len(before.states):]
    couplings = after.couplings[len(before.couplings):]
    if t is None or t.output not in {s.name for s in states}:
        return errs + ["no teacher, or its output is not a teacher state"]
    errs += [f"state {s.name}: not a frozen teacher state" for s in states
             if s.role != "teacher" or s.neuron != "rate" or s.act != s.source_act
             or not s.name.startswith("teacher.")]
    errs += [f"coupling {c.name}: not a teacher coupling" for c in couplings
             if c.kind != "teacher" or c.feedback or not c.name.startswith("teacher.")]
    shared = {w for c in couplings for op in c.ops for w in op_weights(op).values()}
    shared |= {s.bias for s in states if s.bias}
    errs += [f"weight {w}: a teacher weight not named teacher.*" for w in sorted(shared)
             if not w.startswith("teacher.")]
    distill = [k for k in after.costs if k.kind == "kl" and k.target == t.output]
    if len(after.costs) != len(before.costs) + 1 or len(distill) != 1 \
            or distill[0].weight != float(opts.teacher_mix):
        errs.append("expected one distillation cost added, of weight mix")
    return errs


def transform(g: Graph, opts: CompileOptions) -> Graph:
    if opts.teacher is None:
        return g.copy()
    if not 0.0 <= opts.teacher_mix <= 1.0:
        raise EpcError(f"--teacher-mix {opts.teacher_mix}: must be in [0, 1]")
    if not opts.teacher_temperature > 0:
        raise EpcError(f"--teacher-temperature {opts.teacher_temperature}: must be > 0")
    t = _teacher_energy(opts.teacher_graph, opts)
    g = g.copy()
    out = g.output_state()
    t_out = t.output_state()

    # ---- shape checks (by position for inputs)
    if [tuple(i.shape) for i in t.inputs] != [tuple(i.shape) for i in g.inputs]:
        raise EpcError(f"--teacher {opts.teacher}: teacher inputs "
                       f"{[list(i.shape) for i in t.inputs]} differ from the model's "
                       f"{[list(i.shape) for i in g.inputs]}")
    if tuple(t_out.shape) != tuple(out.shape):
        raise EpcError(f"--teacher {opts.teacher}: teacher output {list(t_out.shape)} differs "
                       f"from the model's output {list(out.shape)}")

    # ---- names: teacher.<name>, kept unique against the student graph
    taken: set[str] = set()

    def fresh(name: str) -> str:
        base, k, new = f"teacher.{name}", 0, f"teacher.{name}"
        while new in taken or g.fresh_name(new) != new:
            k += 1
            new = f"{base}_{k}"
        taken.add(new)
        return new

    inputs = {ti.name: si.name for ti, si in zip(t.inputs, g.inputs)}
    wmap = {w: fresh(w) for w in t.weights}
    smap = {s.name: fresh(s.name) for s in t.states}
    for w, new in wmap.items():
        g.weights[new] = t.weights[w]
    for s in t.states:
        g.states.append(dataclasses.replace(s, name=smap[s.name], role="teacher",
                                            neuron="rate", act=s.source_act,
                                            bias=wmap[s.bias] if s.bias else None))
    for c in t.couplings:
        ops = [copy.deepcopy(op) for op in c.ops]
        for op in ops:
            for field, w in op_weights(op).items():
                setattr(op, field, wmap[w])
        src = inputs.get(c.src, smap.get(c.src))
        g.couplings.append(type(c)(fresh(c.name), src, smap[c.dst], ops, "teacher", False))

    # ---- teacher entity and costs
    mix, temp = float(opts.teacher_mix), float(opts.teacher_temperature)
    g.teacher = Teacher(g.fresh_name("teacher"), str(opts.teacher), smap[t_out.name], temp, mix)
    for c in g.costs:
        if c.state == out.name and c.target == "label":
            c.weight = float(c.weight) * (1.0 - mix)
    g.costs.append(Cost(g.fresh_name("distill"), out.name, "kl", smap[t_out.name], mix, temp))
    return g


PASS = Pass("teacher", transform, requires, ensures, enabled, "--teacher")
run = PASS.run
