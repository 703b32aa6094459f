"""The compile passes, one module each, in pipeline order, and the entry points that run
them: `build_pipeline` (what `epc compile` runs) and `run_passes` / `opt_text` (run named
passes on a graph or on IR text: what `epc opt IN.epir --pass NAME` is a thin layer over).

Each module defines its `PASS` (compiler/passes/manager.py: a transform with checked
requires / ensures conditions, stated in the module docstring) and `run = PASS.run`.
"""
from __future__ import annotations

from typing import Sequence, TextIO

from ..errors import EpcError
from ..ir import Graph
from ..options import CompileOptions
from ..text import parse, print_graph
from . import (canonicalize, pool_first, readout, residual, schedule, symmetrize, taps,
               teacher, to_energy)
from .manager import Pass, PassManager

PASS_NAMES: tuple[str, ...] = ("canonicalize", "pool_first", "to_energy", "symmetrize",
                               "residual", "taps", "teacher", "readout", "schedule")

PASSES: dict[str, Pass] = {m.PASS.name: m.PASS for m in (
    canonicalize, pool_first, to_energy, symmetrize, residual, taps, teacher, readout,
    schedule)}
assert tuple(PASSES) == PASS_NAMES


def build_pipeline(opts: CompileOptions | None = None) -> list[Pass]:
    """The default pipeline, every pass in order (the manager skips those the options
    leave off; every pass reads what it needs from the options at run time)."""
    return [PASSES[name] for name in PASS_NAMES]


def run_passes(source: Graph | str, passes: Sequence[str] | None = None,
               options: CompileOptions | None = None, *, source_name: str = "<text>",
               print_after_all: bool = False, print_after: set[str] | None = None,
               out: TextIO | None = None, weights: str = "seeded") -> Graph:
    """Run the named passes, in the order given, on a graph or on IR text; returns the
    result (the input graph is not modified).

    `passes` None runs the default pipeline (skipping the passes the options leave off,
    as `epc compile` does). A pass named explicitly must be switched on by the options
    (e.g. 'pool_first' needs options.pool_first): an EpcError says which option, rather
    than running a pass that would do nothing. Each pass's preconditions are checked (an
    EpcError naming the graph and the pass when they fail) and its result verified.

    options.teacher 'source' takes the input graph itself as the teacher when it is
    feedforward (as `epc compile --teacher source` does); a teacher from a file must be
    loaded by the caller into options.teacher_graph (the compiler loads no models).
    Printing (print_after_all / print_after, to `out`) is the pass manager's; `weights` is
    how printed IR writes weights (text.print_graph).
    """
    opts = (options or CompileOptions()).check()
    g = parse(source, source=source_name) if isinstance(source, str) else source
    if passes is None:
        pipeline = build_pipeline(opts)
    else:
        unknown = [p for p in passes if p not in PASSES]
        if unknown:
            raise EpcError(f"unknown pass {unknown[0]!r} (passes: {', '.join(PASS_NAMES)})")
        pipeline = [PASSES[p] for p in passes]
        off = [p for p in pipeline if not p.enabled(opts)]
        if off:
            raise EpcError(f"pass {off[0].name} is off under these options: it runs with "
                           f"{off[0].switch}")
    if opts.teacher == "source" and opts.teacher_graph is None and \
            any(p.name == "teacher" for p in pipeline):
        if g.is_energy:
            raise EpcError(f"graph {g.name}: --teacher source takes the input as the teacher "
                           f"and needs it feedforward; this one is in energy form (load the "
                           f"teacher model into options.teacher_graph)")
        opts.teacher_graph = g.copy()
    pm = PassManager(pipeline, print_after=print_after, print_after_all=print_after_all,
                     out=out, weights=weights)
    return pm.run(g, opts)


def opt_text(text: str, passes: Sequence[str] | None, options: CompileOptions | None = None,
             *, source_name: str = "<text>", weights: str = "seeded") -> str:
    """`run_passes` on IR text, returning the result printed as IR text (`epc opt`)."""
    return print_graph(run_passes(text, passes, options, source_name=source_name),
                       weights=weights)


__all__ = ["PASS_NAMES", "PASSES", "build_pipeline", "run_passes", "opt_text", "Pass",
           "PassManager"]
