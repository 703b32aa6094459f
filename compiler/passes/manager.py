"""A small pass manager: named passes graph -> graph, printable after each.

Each pass is a module in compiler/passes/ exposing `run(graph, options) -> graph` and a
docstring stating what it requires and ensures. The manager verifies the IR after every
pass (cheap: structural checks only), so a pass that breaks an invariant is caught at once
and named.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, TextIO

from ..errors import EpcError
from ..ir import Graph
from ..options import CompileOptions
from ..text import print_graph
from ..verify import problems

PassFn = Callable[[Graph, CompileOptions], Graph]


def require_energy(g: Graph, pass_name: str) -> None:
    """The precondition every pass after to_energy shares: the graph is in energy form."""
    if not g.is_energy:
        raise EpcError(f"graph {g.name}: {pass_name} needs an energy-form graph "
                       f"(run to_energy)")


@dataclass
class Pass:
    name: str
    fn: PassFn


@dataclass
class PassRecord:
    name: str
    seconds: float


class PassManager:
    def __init__(self, passes: list[Pass], *, print_after: set[str] | None = None,
                 print_after_all: bool = False, out: TextIO | None = None,
                 verify_each: bool = True):
        self.passes = passes
        self.print_after = set(print_after or ())
        unknown = self.print_after - {p.name for p in passes}
        if unknown:
            raise EpcError(f"--print-after: unknown pass {sorted(unknown)[0]!r} (passes: "
                           f"{', '.join(p.name for p in passes)})")
        self.print_after_all = print_after_all
        self.out = out
        self.verify_each = verify_each
        self.records: list[PassRecord] = []

    def run(self, g: Graph, opts: CompileOptions) -> Graph:
        for p in self.passes:
            t0 = time.perf_counter()
            g = p.fn(g, opts)
            self.records.append(PassRecord(p.name, time.perf_counter() - t0))
            if self.verify_each:
                errs = problems(g)
                if errs:
                    raise EpcError(f"internal error: IR invalid after pass {p.name}: "
                                   + "; ".join(errs[:5]))
            if self.out is not None and (self.print_after_all or p.name in self.print_after):
                self.out.write(f"// ----- IR after {p.name}\n")
                self.out.write(print_graph(g))
        return g
