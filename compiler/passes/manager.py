"""A small pass manager: named passes graph -> graph with checked conditions, printable
after each.

Each pass module in compiler/passes/ defines a `Pass` (its `PASS`) from four functions:

    transform(graph, options) -> graph         the rewrite: a new graph, the input untouched
    requires(graph, options) -> [problem]      its precondition (empty list: it holds)
    ensures(before, after, options) -> [problem]   its postcondition
    enabled(options) -> bool                   whether the options switch it on

and its module docstring states the same conditions in words. `Pass.run` (the module's
`run`) checks the precondition, transforms, verifies the result (compiler.verify) and checks
the postcondition: a failed precondition is the input's fault (an EpcError naming the graph
and the pass, e.g. a feedforward pass handed an energy graph by `epc opt`), a failed
postcondition or an invalid result is a bug in the pass ('internal error', naming it).

The PassManager runs a list of passes in order, skipping those the options leave off (a
pass that is off would be the identity), and prints the IR after the passes that ran
(`--print-after-all`) or after named ones (`--print-after`). A pass whose result prints
exactly like the IR printed just before it gets one line, `// ----- IR after NAME
(unchanged)`, instead of a second copy.
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
Requires = Callable[[Graph, CompileOptions], "list[str]"]
Ensures = Callable[[Graph, Graph, CompileOptions], "list[str]"]


def _always(opts: CompileOptions) -> bool:
    return True


def _nothing(g: Graph, opts: CompileOptions) -> list[str]:
    return []


def _nothing_after(before: Graph, after: Graph, opts: CompileOptions) -> list[str]:
    return []


@dataclass
class Pass:
    name: str
    fn: PassFn                       # the transform
    requires: Requires = _nothing
    ensures: Ensures = _nothing_after
    enabled: Callable[[CompileOptions], bool] = _always
    switch: str | None = None        # the option that turns it on ('--pool-first'), if any

    def run(self, g: Graph, opts: CompileOptions, *, check: bool = True) -> Graph:
        """The pass with its conditions checked (see the module docstring)."""
        bad = self.requires(g, opts)
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise EpcError(f"graph {g.name}: {self.name}: {bad[0]}{more}")
        new = self.fn(g, opts)
        if check:
            errs = problems(new)
            if errs:
                raise EpcError(f"internal error: IR invalid after pass {self.name}: "
                               + "; ".join(errs[:5]))
            errs = self.ensures(g, new, opts)
            if errs:
                raise EpcError(f"internal error: pass {self.name} broke its postcondition: "
                               + "; ".join(errs[:5]))
        return new


@dataclass
class PassRecord:
    name: str
    seconds: float


class PassManager:
    def __init__(self, passes: list[Pass], *, print_after: set[str] | None = None,
                 print_after_all: bool = False, out: TextIO | None = None,
                 verify_each: bool = True, weights: str = "seeded"):
        self.passes = passes
        self.print_after = set(print_after or ())
        unknown = self.print_after - {p.name for p in passes}
        if unknown:
            raise EpcError(f"--print-after: unknown pass {sorted(unknown)[0]!r} (passes: "
                           f"{', '.join(p.name for p in passes)})")
        self.print_after_all = print_after_all
        self.out = out
        self.verify_each = verify_each
        self.weights = weights           # how printed IR writes weights (text.print_graph)
        self.records: list[PassRecord] = []
        self.skipped: list[str] = []

    def run(self, g: Graph, opts: CompileOptions) -> Graph:
        last_text = None    # the IR printed for the last pass that ran, if it was printed
        for p in self.passes:
            if not p.enabled(opts):
                # off: the pass would return its input, so the graph (and last_text) stand
                self.skipped.append(p.name)
                if self.out is not None and p.name in self.print_after:
                    self.out.write(f"// ----- {p.name} did not run ({p.switch} is off)\n")
                continue
            t0 = time.perf_counter()
            g = p.run(g, opts, check=self.verify_each)
            self.records.append(PassRecord(p.name, time.perf_counter() - t0))
            if self.out is not None and (self.print_after_all or p.name in self.print_after):
                text = print_graph(g, weights=self.weights)
                if text == last_text:
                    self.out.write(f"// ----- IR after {p.name} (unchanged)\n")
                else:
                    self.out.write(f"// ----- IR after {p.name}\n")
                    self.out.write(text)
                last_text = text
            else:
                last_text = None
        return g
