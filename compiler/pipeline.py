"""The compile pipeline on graphs: run the passes on a feedforward graph, or take an already
compiled graph through with its schedule adjusted.

Graphs in, graphs out: loading a source model (ONNX, PyTorch, a bundle) and checking the
result against it is the driver's (epc/sources.py, epc/api.py), so nothing here imports a
frontend.
"""
from __future__ import annotations

import dataclasses
from typing import TextIO

import numpy as np

from .errors import EpcError
from .ir import Graph
from .options import CompileOptions
from .passes.manager import PassManager

# Options that change the network (its structure or its initial weights): refused for
# already compiled inputs when given (set, and not to their default).
STRUCTURAL = ("taps", "teacher", "pool_first", "readout", "skip_gain", "feedback_gain")


def require_weights(g: Graph, where: str, hint: str) -> None:
    """Compiling needs every weight's data: a text IR that only declares one is refused,
    naming the first such weight."""
    missing = [n for n, w in g.weights.items() if not isinstance(w, np.ndarray)]
    if missing:
        raise EpcError(f"{where}: weight {missing[0]} has no data in the IR text; give it as "
                       f"`= seeded(N)` or a literal tensor, or {hint}")


def compile_graph(ff: Graph, opts: CompileOptions, *, print_after: set[str] | None = None,
                  print_after_all: bool = False, out: TextIO | None = None) -> Graph:
    """Run the default pass pipeline on a feedforward graph; returns the energy graph."""
    from .passes import build_pipeline
    from .verify import verify
    verify(ff)
    pm = PassManager(build_pipeline(opts), print_after=print_after,
                     print_after_all=print_after_all, out=out)
    return pm.run(ff, opts)


def pass_through(g: Graph, opts: CompileOptions, *, where: str,
                 schedule_overrides: dict | None = None) -> Graph:
    """An already compiled (maybe trained) energy graph: unchanged, except that
    `schedule_overrides` (mode, max_sweeps, nudge_sweeps, tol) replace the fields of its
    schedule. Options that would change the network are refused, naming their flag."""
    default = CompileOptions()
    given = [k for k in STRUCTURAL if getattr(opts, k) and getattr(opts, k) != getattr(default, k)]
    if given:
        flag = given[0].replace("_", "-")
        raise EpcError(f"{where}: already compiled; --{flag} applies to feedforward "
                       f"sources (ONNX or PyTorch)")
    require_weights(g, where, "compile from the bundle (.epc) or the source model")
    from .verify import verify
    if schedule_overrides and g.schedule is not None:
        g.schedule = dataclasses.replace(g.schedule, **schedule_overrides)
    verify(g)
    return g
