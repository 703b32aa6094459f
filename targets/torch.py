"""The PyTorch target: an energy graph checked against what the runtime executes, as a bundle.

`emit(graph, out_path, options)` verifies that the graph is in energy form, has a settling
schedule and uses only ops, activations, costs and roles the runtime implements, and writes
a bundle with target 'torch' (the runtime's input; `epc train`, `epc eval` and
`epc check-gradients` read it). `load_for_runtime(path)` is the inverse used by the
runtime: it accepts 'torch' bundles and plain IR bundles of an energy graph (target None,
lowered on the fly) and refuses any other target, and feedforward graphs (compiling is the
driver's: `epc compile`), with a clear message.
"""
from __future__ import annotations

import dataclasses
import os

from epc.compiler import ops as O
from epc.compiler.bundle import Bundle, read_bundle, write_bundle
from epc.compiler.errors import EpcError
from epc.compiler.ir import Activation, Graph
from epc.compiler.verify import verify

TARGET = "torch"
RUNTIME_VERSION = 1
SUPPORTED_ACTS = ("identity", "relu", "clip", "hardsigmoid")
SUPPORTED_COSTS = ("mse", "ce", "kl")


def supported_ops() -> tuple[str, ...]:
    """The ops the runtime executes: every linear op of the op registry, through its rule."""
    return tuple(t.kind for t, r in O.RULES.items() if r.linear)


def check_supported(g: Graph, where: str | None = None) -> Graph:
    """Raise EpcError unless the runtime can execute `g`."""
    w = where or f"graph {g.name}"
    if not g.is_energy:
        raise EpcError(f"{w}: not in energy form (it has feedforward nodes); compile it with "
                       f"`epc compile MODEL --target torch`")
    if g.schedule is None:
        raise EpcError(f"{w}: has no settling schedule; compile it with epc compile")
    verify(g)
    for c in g.couplings:
        for op in c.ops:
            if op.kind not in supported_ops():
                raise EpcError(f"{w}: coupling {c.name}: op {op.kind} is not supported by the "
                               f"torch runtime (supported: {', '.join(supported_ops())})")
            why = O.rule(op).unsupported(op)
            if why:
                raise EpcError(f"{w}: coupling {c.name}: {why} is not supported by the torch "
                               f"runtime")
    for s in g.states:
        if s.act.kind not in SUPPORTED_ACTS:
            raise EpcError(f"{w}: state {s.name}: activation {s.act.kind} is not supported "
                           f"(supported: {', '.join(SUPPORTED_ACTS)})")
    for c in g.costs:
        if c.kind not in SUPPORTED_COSTS:
            raise EpcError(f"{w}: cost {c.name}: kind {c.kind} is not supported")
        if c.target != "label" and g.state(c.target).role != "teacher":
            raise EpcError(f"{w}: cost {c.name}: target {c.target} must be 'label' or a "
                           f"teacher state")
    if not g.costs:
        raise EpcError(f"{w}: has no cost; nothing to nudge")
    return g


def _jsonable(v):
    if isinstance(v, Activation):
        return {"kind": v.kind, **v.fields()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
        return list(v)
    return None


def options_meta(options) -> dict:
    if options is None or not dataclasses.is_dataclass(options):
        return {}
    out = {}
    for f in dataclasses.fields(options):
        v = _jsonable(getattr(options, f.name))
        if v is not None:
            out[f.name] = v
    return out


def emit(graph: Graph, out_path: str | os.PathLike, options=None) -> None:
    """Write `graph` as a bundle for the torch runtime (target 'torch')."""
    check_supported(graph)
    meta = {"runtime": "epc.runtime", "runtime_version": RUNTIME_VERSION,
            "compile_options": options_meta(options)}
    write_bundle(out_path, Bundle(graph, target=TARGET, meta=meta))


def lower(b: Bundle, where: str) -> Bundle:
    """A bundle the runtime can execute (target 'torch'), from a torch or plain IR bundle."""
    if b.target not in (None, TARGET):
        raise EpcError(f"{where}: bundle compiled for target {b.target!r}; the torch runtime "
                       f"reads target 'torch' or plain IR bundles (recompile with "
                       f"--target torch)")
    g = b.graph
    if not g.is_energy:
        raise EpcError(f"{where}: a feedforward graph; compile it first with "
                       f"`epc compile {where} --target torch`")
    check_supported(g, where)
    return Bundle(g, target=TARGET, meta=dict(b.meta), arrays=dict(b.arrays), docs=dict(b.docs))


def load_for_runtime(path: str | os.PathLike) -> Bundle:
    """Read a bundle for the runtime; refuses other targets and unsupported graphs."""
    return lower(read_bundle(path), str(path))
