"""Views of a graph for `epc inspect`: JSON for scripts, DOT for pictures, statistics.

The textual IR (compiler/text.py) is the primary view; these are derived from it.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from . import ops as O
from .ir import Graph, op_weights


def _op_json(op) -> dict:
    d = {"op": op.kind}
    for f in dataclasses.fields(op):
        v = getattr(op, f.name)
        d[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return d


def _act(a) -> dict:
    return {"kind": a.kind, **a.fields()}


def stats(g: Graph) -> dict:
    """Counts, parameters, colours and multiply-accumulates per settling sweep."""
    by_kind = Counter(c.kind for c in g.couplings)
    macs_fwd = macs_fb = 0
    for c in g.couplings:
        m = sum(O.chain_macs(c.ops, g.shape_of(c.src), g.weights))
        macs_fwd += m
        if c.feedback:
            macs_fb += m
    ff_macs = 0
    for n in g.nodes:
        ins = [g.shape_of(x) for x in n.inputs]
        ff_macs += O.macs(n.op, ins[0] if ins else (), n.shape, g.weights)
    return {
        "form": "energy" if g.is_energy else "feedforward",
        "inputs": len(g.inputs),
        "states": len(g.states),
        "states_by_role": dict(Counter(s.role for s in g.states)),
        "neurons": int(sum(np.prod(s.shape) for s in g.settled_states())),
        "couplings": len(g.couplings),
        "couplings_by_kind": dict(by_kind),
        "nodes": len(g.nodes),
        "parameters": g.num_parameters(learnable_only=True),
        "frozen_parameters": g.num_parameters(False) - g.num_parameters(True),
        "colours": len(g.schedule.classes) if g.schedule else 0,
        "schedule_mode": g.schedule.mode if g.schedule else None,
        # one sweep evaluates every coupling forward, plus its transpose where it has feedback
        "macs_per_sweep": int(macs_fwd + macs_fb) if g.is_energy else None,
        "macs_feedforward": int(ff_macs) if g.nodes else int(macs_fwd),
    }


def to_json(g: Graph, *, with_stats: bool = False) -> dict:
    d = {
        "name": g.name,
        "attrs": dict(g.attrs),
        "form": "energy" if g.is_energy else "feedforward",
        "inputs": [{"name": i.name, "shape": list(i.shape)} for i in g.inputs],
        "weights": [{"name": n, "shape": list(w.shape)} for n, w in sorted(g.weights.items())],
        "nodes": [{"name": n.name, "op": _op_json(n.op), "inputs": list(n.inputs),
                   "shape": list(n.shape)} for n in g.nodes],
        "outputs": list(g.outputs),
        "states": [{"name": s.name, "shape": list(s.shape), "activation": _act(s.act),
                    "source_activation": _act(s.source_act), "neuron": s.neuron,
                    "role": s.role, "bias": s.bias, "readout": s.readout}
                   for s in g.states],
        "couplings": [{"name": c.name, "src": c.src, "dst": c.dst, "kind": c.kind,
                       "feedback": c.feedback, "ops": [_op_json(op) for op in c.ops],
                       "weights": [w for op in c.ops for w in op_weights(op).values()]}
                      for c in g.couplings],
        "costs": [dataclasses.asdict(c) for c in g.costs],
        "teacher": dataclasses.asdict(g.teacher) if g.teacher else None,
        "schedule": dataclasses.asdict(g.schedule) if g.schedule else None,
    }
    if with_stats:
        d["stats"] = stats(g)
    return d


_EDGE_STYLE = {"forward": "solid", "residual": "dashed", "tap": "dotted", "teacher": "bold"}
_ROLE_COLOUR = {"hidden": "lightblue", "output": "palegreen", "tap": "khaki",
                "teacher": "lightgrey"}


def _q(s: str) -> str:
    return '"' + s.replace('"', '\\"') + '"'


def to_dot(g: Graph) -> str:
    """Graphviz DOT: inputs as boxes, states coloured by role, couplings styled by kind
    (feedback drawn as a two-headed edge)."""
    lines = [f"digraph {_q(g.name)} {{", "  rankdir=LR;", "  node [fontname=Helvetica];"]
    for i in g.inputs:
        lines.append(f"  {_q(i.name)} [shape=box, label={_q(f'{i.name} {list(i.shape)}')}];")
    if g.is_energy:
        colour = {}
        if g.schedule:
            colour = {n: k for k, cls in enumerate(g.schedule.classes) for n in cls}
        for s in g.states:
            label = f"{s.name} {list(s.shape)}\\n{s.act.kind}"
            if s.name in colour:
                label += f" / colour {colour[s.name]}"
            if s.readout:
                label += " / readout"
            lines.append(f"  {_q(s.name)} [shape=ellipse, style=filled, "
                         f"fillcolor={_ROLE_COLOUR.get(s.role, 'white')}, label={_q(label)}];")
        for c in g.couplings:
            chain = " > ".join(op.kind for op in c.ops)
            lines.append(f"  {_q(c.src)} -> {_q(c.dst)} [label={_q(chain)}, "
                         f"style={_EDGE_STYLE.get(c.kind, 'solid')}, "
                         f"dir={'both' if c.feedback else 'forward'}];")
        for c in g.costs:
            cid = f"cost:{c.name}"
            lines.append(f"  {_q(cid)} [shape=diamond, label={_q(f'{c.kind} ({c.target})')}];")
            lines.append(f"  {_q(c.state)} -> {_q(cid)} [style=dotted];")
    else:
        for n in g.nodes:
            lines.append(f"  {_q(n.name)} [shape=box, style=rounded, "
                         f"label={_q(f'{n.name}: {n.op.kind} {list(n.shape)}')}];")
            for x in n.inputs:
                lines.append(f"  {_q(x)} -> {_q(n.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def stats_table(st: dict) -> str:
    rows = [("form", st["form"]), ("states", f"{st['states']} "
             f"({', '.join(f'{k} {v}' for k, v in st['states_by_role'].items())})"),
            ("neurons (settled)", f"{st['neurons']:,}"),
            ("couplings", f"{st['couplings']} "
             f"({', '.join(f'{k} {v}' for k, v in st['couplings_by_kind'].items())})"),
            ("parameters (learnable)", f"{st['parameters']:,}"),
            ("parameters (frozen teacher)", f"{st['frozen_parameters']:,}"),
            ("colour classes", f"{st['colours']} ({st['schedule_mode']})")]
    if st["macs_per_sweep"] is not None:
        rows.append(("MACs per sweep (per sample)", f"{st['macs_per_sweep']:,}"))
    rows.append(("MACs feedforward (per sample)", f"{st['macs_feedforward']:,}"))
    if st["nodes"]:
        rows.insert(1, ("feedforward nodes", str(st["nodes"])))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows) + "\n"
