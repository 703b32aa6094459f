"""teacher: attach a frozen teacher network for knowledge distillation.

The teacher is a feedforward model (opts.teacher_graph, set by the driver: for
opts.teacher == 'source' the source model itself, else the model loaded from the path in
opts.teacher). It is converted like the student (canonicalize + to_energy) and merged into
the graph as a frozen, feedforward-only subnetwork: the runtime computes its states once
per input in topological order and never settles or trains them.

Requires: an energy-form student graph with one output state and a label cost;
          opts.teacher_graph a feedforward graph with as many inputs of the same shapes as
          the student and an output of the student output's shape.
Ensures:  when opts.teacher is None the graph is unchanged. Otherwise:
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
"""
from __future__ import annotations

import copy
import dataclasses

from ..errors import EpcError
from ..ir import Cost, Graph, Teacher, op_weights
from ..options import CompileOptions
from .manager import require_energy
from . import canonicalize, to_energy


def _teacher_energy(tg: Graph, opts: CompileOptions) -> Graph:
    if not isinstance(tg, Graph):
        raise EpcError(f"--teacher {opts.teacher}: no teacher model was loaded "
                       f"(CompileOptions.teacher_graph is not set)")
    if tg.states or not tg.nodes:
        raise EpcError(f"--teacher {opts.teacher}: the teacher must be a feedforward model "
                       f"(ONNX or PyTorch), not a compiled graph")
    topts = copy.copy(opts)
    topts.neuron = "rate"
    topts.teacher_graph = None
    try:
        return to_energy.convert(canonicalize.run(tg, topts), topts)
    except EpcError as e:
        raise EpcError(f"--teacher {opts.teacher}: {e}")


def run(g: Graph, opts: CompileOptions) -> Graph:
    if opts.teacher is None:
        return g.copy()
    require_energy(g, "teacher")
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

