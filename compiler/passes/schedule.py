"""schedule: colour the state interaction graph into blocks that can update together.

Two settled states interact when a coupling joins them (in either direction: the forward
term drives the destination, the tied transpose drives the source). States that share no
coupling can be updated simultaneously and each block update is an exact minimisation of
the energy over that block, so a proper colouring of the interaction graph gives a schedule
that lowers the energy every sweep.

* A bipartite interaction graph (a plain chain, or skips over an odd number of layers) gets
  its 2-colouring. Layer parity is NOT used: a skip over two layers joins states of equal
  parity, and then the graph is not bipartite.
* Otherwise networkx greedy colouring; the strategies 'DSATUR', 'largest_first' and
  'smallest_last' are tried and the one with the fewest colours is kept (ties: that order).

Classes are ordered by how close they are to the input: the class containing the state at
the smallest depth (coupling distance from an input) comes first, then the others by their
shallowest member. Settling starts from zeros, so updating the class that sees the clamped
input first lets the input's drive propagate forward within the first sweep instead of
waiting one sweep per layer. Within a class states are listed by depth, then graph order.

Mode 'sync' keeps the same classes (so the colouring is still visible), but the runtime
updates every state at once from the previous sweep; the verifier checks colour separation
only in mode 'colour'.

A graph with bernoulli states also gets the schedule's `spiking` part (ir.Spiking: the
time steps of each phase, the rate estimate's averaging, the nudged phases' sampling):
`spiking_defaults` by the graph's depth, then the options' --time-steps,
--nudge-time-steps, --averaging and --sampling where given (`spiking_for`).

Requires: an energy-form graph.
Ensures:  graph.schedule = Schedule(opts.schedule, classes, opts.max_sweeps,
          opts.nudge_sweeps, opts.tol, spiking), spiking = spiking_for(graph, opts) when a
          state is bernoulli, else None; every settled (non-teacher) state is in exactly one
          class; in each class no two states share a coupling (in mode 'sync' too); the
          first class holds a state nearest the input; nothing but the schedule changes.
The pass manager checks these conditions.
"""
from __future__ import annotations

import dataclasses

import networkx as nx

from ..errors import EpcError
from ..ir import Graph, Schedule, Spiking
from ..options import CompileOptions
from . import conditions as C
from .manager import Pass
from .residual import output_depth

STRATEGIES = ("DSATUR", "largest_first", "smallest_last")


def interaction_graph(g: Graph) -> nx.Graph:
    settled = [s.name for s in g.settled_states()]
    ug = nx.Graph()
    ug.add_nodes_from(settled)
    names = set(settled)
    ug.add_edges_from((c.src, c.dst) for c in g.couplings
                      if c.src in names and c.dst in names and c.src != c.dst)
    return ug


def input_distance(g: Graph) -> dict[str, int]:
    """Shortest coupling distance (undirected) from any input to each settled state."""
    ug = nx.Graph()
    ug.add_nodes_from(s.name for s in g.settled_states())
    ug.add_nodes_from(i.name for i in g.inputs)
    settled = {s.name for s in g.settled_states()} | {i.name for i in g.inputs}
    ug.add_edges_from((c.src, c.dst) for c in g.couplings if c.src in settled and c.dst in settled)
    ug.add_node("__inputs__")
    ug.add_edges_from(("__inputs__", i.name) for i in g.inputs)
    dist = nx.single_source_shortest_path_length(ug, "__inputs__")
    big = len(ug) + 1  # states the input does not reach go last
    return {s.name: dist.get(s.name, big) - 1 for s in g.settled_states()}


def colour(ug: nx.Graph) -> dict[str, int]:
    if nx.is_bipartite(ug):
        return nx.bipartite.color(ug)
    best = None
    for strategy in STRATEGIES:
        col = nx.greedy_color(ug, strategy=strategy)
        if best is None or max(col.values()) < max(best.values()):
            best = col
    return best


def classes(g: Graph) -> list[list[str]]:
    ug = interaction_graph(g)
    if not len(ug):
        return []
    col = colour(ug)
    dist = input_distance(g)
    order = {s.name: k for k, s in enumerate(g.settled_states())}
    groups: dict[int, list[str]] = {}
    for name, c in col.items():
        groups.setdefault(c, []).append(name)
    key = lambda n: (dist[n], order[n])  # noqa: E731
    out = [sorted(members, key=key) for members in groups.values()]
    out.sort(key=lambda members: key(members[0]))
    return out


# --neuron bernoulli: the time steps and averaging when --time-steps, --nudge-time-steps
# and --averaging are not given, by H, the hidden states on the longest input -> output
# path (the depth the nudge travels back). A trace of time constant tau delays each layer
# by about tau steps, and at symmetric feedback (auto keeps gain 1 for bernoulli nets:
# symmetrize.py) a deep net's mean field itself settles slowly, so at 64/32 steps the
# nudge has not reached the first layers when the nudged phases end: on mlp3_digits at
# initialisation (K = 4) the first coupling's mean estimate has cosine 0.53 and norm 0.36
# of the reference. Measured (docs/stochep.md):
# - H = 1 (mlp_digits, conv1_digits, Fashion-MNIST 784-256-10): 64 free / 32 nudged steps,
#   trace:8 (mlp_digits 30 epochs: 98.06% against the rate net's 98.61%).
# - H >= 2: both phases DEEP_STEPS_PER_HIDDEN * H steps, trace:DEEP_TAU. A shorter trace
#   settles faster at the price of noise the phase's second-half mean takes out: mlp3_digits
#   weights trained at rate, run spiking: 64 steps 75.8% (trace:8) / 89.2% (trace:4), 128
#   steps 90.0% / 93.3% (the rate net 94.7%); the estimate at 64/64 steps, first coupling:
#   cosine 0.83 / 0.86, norm 0.56 / 0.99. mlp3_digits 30 epochs at 192/192, trace:4:
#   96.94% against the rate net's 97.78% (64/32, trace:8: 90.00% against 97.50%).
SHALLOW = Spiking(time_steps=64, nudge_time_steps=32, averaging="trace", tau=8)
DEEP_STEPS_PER_HIDDEN = 64
DEEP_TAU = 4


def hidden_depth(g: Graph) -> int:
    """Hidden states on the longest coupling path from an input to an output state."""
    return output_depth(g) - 1


def spiking_defaults(g: Graph) -> Spiking:
    """The spiking part a bernoulli graph gets when no spiking flag is given (above)."""
    h = hidden_depth(g)
    if h <= 1:
        return dataclasses.replace(SHALLOW)
    steps = DEEP_STEPS_PER_HIDDEN * h
    return Spiking(time_steps=steps, nudge_time_steps=steps, averaging="trace", tau=DEEP_TAU)


def spiking_for(g: Graph, opts: CompileOptions) -> Spiking:
    """The spiking part of bernoulli graph g: the depth defaults, then the flags given."""
    return opts.spiking(spiking_defaults(g))


def requires(g: Graph, opts: CompileOptions) -> list[str]:
    return C.energy(g)


def ensures(before: Graph, after: Graph, opts: CompileOptions) -> list[str]:
    errs = C.energy(after)
    for what in ("states", "couplings", "costs"):
        if getattr(after, what) != getattr(before, what):
            errs.append(f"the {what} changed (this pass only adds the schedule)")
    s = after.schedule
    if s is None:
        return errs + ["no schedule"]
    if (s.mode, s.max_sweeps, s.nudge_sweeps, s.tol) != (
            opts.schedule, opts.max_sweeps, opts.nudge_sweeps, opts.tol):
        errs.append("the schedule's mode, caps or tolerance differ from the options")
    if s.spiking != (spiking_for(after, opts) if after.stochastic else None):
        errs.append("the schedule's spiking part does not match the bernoulli states and the "
                    "options")
    colour = {n: k for k, cls in enumerate(s.classes) for n in cls}
    listed = [n for cls in s.classes for n in cls]
    if sorted(listed) != sorted(x.name for x in after.settled_states()):
        errs.append("the classes do not hold every settled state exactly once")
    errs += [f"coupled states {c.src} and {c.dst} share class {colour[c.src]}"
             for c in after.couplings if c.src in colour and c.dst in colour
             and c.src != c.dst and colour[c.src] == colour[c.dst]]
    if s.classes:
        dist = input_distance(after)
        if min(dist[n] for n in s.classes[0]) != min(dist.values()):
            errs.append("the first class holds no state nearest the input")
    return errs


def transform(g: Graph, opts: CompileOptions) -> Graph:
    if opts.schedule not in ("colour", "sync"):
        raise EpcError(f"bad schedule {opts.schedule!r} (supported: colour, sync)")
    g = g.copy()
    g.schedule = Schedule(opts.schedule, classes(g), int(opts.max_sweeps),
                          int(opts.nudge_sweeps), float(opts.tol),
                          spiking_for(g, opts) if g.stochastic else None)
    return g


PASS = Pass("schedule", transform, requires, ensures)
run = PASS.run
