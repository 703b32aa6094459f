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


def check_neuron_flags(g: Graph, opts: CompileOptions, given: dict | None, where: str) -> None:
    """The flags that apply to one neuron model only, against the compiled graph `g`:
    the spiking options need bernoulli states; the sweep caps and the tolerance (`given`:
    the schedule flags set) are a rate network's, and a bernoulli network runs exactly
    its time steps, so on one they would do nothing."""
    spiking = opts.spiking_given()
    if spiking and not g.stochastic:
        raise EpcError(f"{where}: {spiking[0]} applies to bernoulli neurons (--neuron "
                       f"bernoulli); this network's neurons are rate")
    if g.stochastic:
        flag = next((f for k, f in (("max_sweeps", "--max-sweeps"),
                                    ("nudge_sweeps", "--nudge-sweeps"), ("tol", "--tol"))
                     if k in (given or {})), None)
        if flag:
            raise EpcError(f"{where}: {flag} applies to rate neurons (a sweep cap or "
                           f"tolerance); a bernoulli network runs each phase for exactly "
                           f"--time-steps / --nudge-time-steps")


def compile_graph(ff: Graph, opts: CompileOptions, *, print_after: set[str] | None = None,
                  print_after_all: bool = False, out: TextIO | None = None) -> Graph:
    """Run the default pass pipeline on a feedforward graph; returns the energy graph."""
    from .passes import build_pipeline
    from .verify import verify
    if opts.spiking_given() and opts.neuron != "bernoulli":
        raise EpcError(f"{opts.spiking_given()[0]} applies to bernoulli neurons; add "
                       f"--neuron bernoulli")
    verify(ff)
    pm = PassManager(build_pipeline(opts), print_after=print_after,
                     print_after_all=print_after_all, out=out)
    return pm.run(ff, opts)


def pass_through(g: Graph, opts: CompileOptions, *, where: str,
                 schedule_overrides: dict | None = None) -> Graph:
    """An already compiled (maybe trained) energy graph: unchanged, except that
    `schedule_overrides` (mode, max_sweeps, nudge_sweeps, tol) replace the fields of its
    schedule, the spiking options replace those of its spiking part, and --neuron
    bernoulli makes a rate graph's states bernoulli (`make_bernoulli`: its weights are
    kept). Options that would change the network are refused, naming their flag."""
    default = CompileOptions()
    given = [k for k in STRUCTURAL if getattr(opts, k) and getattr(opts, k) != getattr(default, k)]
    if given:
        flag = given[0].replace("_", "-")
        raise EpcError(f"{where}: already compiled; --{flag} applies to feedforward "
                       f"sources (ONNX or PyTorch)")
    require_weights(g, where, "compile from the bundle (.epc) or the source model")
    from .verify import verify
    if opts.neuron == "bernoulli" and not g.stochastic:
        g = make_bernoulli(g, opts)
    if schedule_overrides and g.schedule is not None:
        g.schedule = dataclasses.replace(g.schedule, **schedule_overrides)
    if g.stochastic and g.schedule is not None:
        g.schedule.spiking = opts.spiking(g.schedule.spiking)
    verify(g)
    return g


def make_bernoulli(g: Graph, opts: CompileOptions) -> Graph:
    """A compiled rate graph with every non-identity, non-teacher state bernoulli (what
    to_energy gives with --neuron bernoulli; an activation outside [0, 1] is refused, naming
    the state), and the schedule's spiking part from its depth and the options (as
    compiling a source gives it: passes/schedule.py spiking_for). Weights are kept: a
    trained rate network runs with spiking neurons."""
    from .passes.to_energy import neuron_for
    g = g.copy()
    for s in g.states:
        if s.role != "teacher":
            s.neuron = neuron_for(s.act, opts, f"state {s.name}")
    if g.schedule is not None and g.stochastic:
        from .passes.schedule import spiking_for
        g.schedule.spiking = spiking_for(g, opts)
    return g
