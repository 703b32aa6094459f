"""taps: auxiliary error taps (intermediate readouts that receive their own nudge).

For each tapped hidden state h the pass adds a small readout head: a State 'tap_<h>'
(role 'tap', identity act, neuron 'rate', shape = the output state's [num_classes], with a
bias), a Coupling 'c_<h>__tap_<h>' of kind 'tap' (feedback True, so the tap's nudge reaches h
through the tied transpose) whose chain is [gavgpool(keepdims=false), dense] for a
[C, H, W] state, [dense] for a 1-D state and [flatten, dense] otherwise, and a Cost of
the label cost's kind on the tap state with weight opts.tap_weight. The new dense weight and
bias are initialised like torch.nn.Linear's default (uniform in +-1/sqrt(fan_in)) from a
numpy RandomState seeded by a CRC of the weight's name, so compiles are reproducible.

Which states (opts.taps):
* None: none (the pass is the identity).
* 'auto': with at most 2 hidden states, none. Otherwise the candidates are the hidden
  states at least 2 couplings (shortest forward path) away from the output, i.e. all but
  the last hidden layer(s) that feed the output directly, whose nudge already arrives
  undamped. Ordered from the deepest (longest path from the input) to the shallowest, every
  other candidate is tapped starting with the deepest, at most 4. A chain h1..h6 -> out:
  h6 feeds the output, so the candidates are h5..h1 and the taps are h5, h3, h1. Spacing
  the taps keeps the extra heads cheap while every stretch of depth gets a nearby error
  signal.
* a list of names (or a comma-separated string): exactly those hidden states; an unknown
  name is an EpcError listing the hidden states.

Runs with: options.taps (`--taps auto` or `--taps h2,h4`); without it the pass does not run.
Requires: an energy-form graph with one output state, of shape [num_classes] when a
          state is tapped.
Ensures:  the graph's states, couplings and costs unchanged, followed by one tap per
          selected hidden state: a state (role 'tap', identity act, 'rate', the output's
          shape, a bias), one coupling into it (kind 'tap', feedback True, from that hidden
          state) and one cost on it (weight opts.tap_weight), with the weights above.
The pass manager checks these conditions, except the initial values (tests/test_passes.py).
"""
from __future__ import annotations

import zlib

import networkx as nx
import numpy as np

from ..errors import EpcError
from ..ir import Activation, Coupling, Cost, Dense, Flatten, GlobalAvgPool, Graph, State
from ..options import CompileOptions
from . import conditions as C
from .manager import Pass
from .residual import depths

MAX_AUTO_TAPS = 4


def _rng(name: str) -> np.random.RandomState:
    return np.random.RandomState(zlib.crc32(name.encode("utf-8")))


def linear_init(name: str, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """torch.nn.Linear's default init (uniform +-1/sqrt(fan_in)), seeded by the name."""
    bound = 1.0 / np.sqrt(max(fan_in, 1))
    return _rng(name).uniform(-bound, bound, size=shape).astype(np.float32)


def auto_taps(g: Graph) -> list[str]:
    """The hidden states 'auto' taps (see the module docstring for the rule)."""
    hidden = [s.name for s in g.states if s.role == "hidden"]
    if len(hidden) <= 2:
        return []
    out = g.output_state().name
    dg = nx.DiGraph()
    dg.add_nodes_from(s.name for s in g.states)
    dg.add_edges_from((c.src, c.dst) for c in g.couplings if c.kind in ("forward", "residual"))
    to_out = nx.single_target_shortest_path_length(dg, out)
    to_out = dict(to_out)
    depth = depths(g)
    order = {n: k for k, n in enumerate(hidden)}
    cands = [h for h in hidden if to_out.get(h, 0) >= 2]
    cands.sort(key=lambda h: (-depth[h], -order[h]))
    return cands[::2][:MAX_AUTO_TAPS]


def selected(g: Graph, spec) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec == "auto":
            return auto_taps(g)
        spec = [x.strip() for x in spec.split(",") if x.strip()]
    hidden = [s.name for s in g.states if s.role == "hidden"]
    unknown = [x for x in spec if x not in hidden]
    if unknown:
        raise EpcError(f"--taps: {', '.join(unknown)} is not a hidden state of graph {g.name} "
                       f"(hidden states: {', '.join(hidden) or 'none'})")
    return list(dict.fromkeys(spec))


def enabled(opts: CompileOptions) -> bool:
    return bool(opts.taps)


def requires(g: Graph, opts: CompileOptions) -> list[str]:
    errs = C.energy(g) or C.one_output_state(g)
    out = None if errs else g.output_state()
    if out is not None and len(out.shape) != 1 and selected(g, opts.taps):
        errs.append(f"--taps needs a 1-D output state (class scores), {out.name} is "
                    f"{list(out.shape)}")
    return errs


def ensures(before: Graph, after: Graph, opts: CompileOptions) -> list[str]:
    errs = C.energy(after) + C.kept(before.states, after.states, "states")
    errs += C.kept(before.couplings, after.couplings, "couplings")
    errs += C.kept(before.costs, after.costs, "costs")
    if errs:
        return errs
    taps = after.states[len(before.states):]
    want = len(selected(before, opts.taps))
    if len(taps) != want:
        errs.append(f"{len(taps)} tap states for {want} selected hidden states")
    hidden = {s.name for s in before.states if s.role == "hidden"}
    out_shape = tuple(after.output_state().shape)
    new_couplings = after.couplings[len(before.couplings):]
    new_costs = after.costs[len(before.costs):]
    for t in taps:
        if (t.role, t.act.kind, t.neuron, tuple(t.shape)) != ("tap", "identity", "rate",
                                                               out_shape) or not t.bias:
            errs.append(f"state {t.name}: not a tap head (role, act, neuron, shape or bias)")
        inb = [c for c in new_couplings if c.dst == t.name]
        if len(inb) != 1 or inb[0].kind != "tap" or not inb[0].feedback \
                or inb[0].src not in hidden:
            errs.append(f"state {t.name}: expected one tap coupling in, from a hidden state")
        costs = [k for k in new_costs if k.state == t.name]
        if len(costs) != 1 or costs[0].weight != float(opts.tap_weight):
            errs.append(f"state {t.name}: expected one cost of weight {opts.tap_weight}")
    if len(new_couplings) != len(taps) or len(new_costs) != len(taps):
        errs.append("couplings or costs added besides the taps'")
    return errs


def transform(g: Graph, opts: CompileOptions) -> Graph:
    g = g.copy()
    names = selected(g, opts.taps)
    if not names:
        return g
    out = g.output_state()
    k = int(out.shape[0])
    label = [c for c in g.costs if c.state == out.name and c.target == "label"]
    kind = label[0].kind if label else opts.cost
    ident = Activation.identity()
    for h in names:
        shape = tuple(g.state(h).shape)
        if len(shape) == 3:
            pre, fan_in = [GlobalAvgPool(keepdims=False)], shape[0]
        elif len(shape) == 1:
            pre, fan_in = [], shape[0]
        else:
            pre, fan_in = [Flatten()], int(np.prod(shape))
        tap = g.fresh_name(f"tap_{h}")
        wname = g.fresh_name(f"{tap}.weight")
        g.weights[wname] = linear_init(wname, (k, fan_in), fan_in)
        bname = g.fresh_name(f"{tap}.bias")
        g.weights[bname] = linear_init(bname, (k,), fan_in)
        # an identity readout has no firing probability: 'rate' even under bernoulli
        g.states.append(State(tap, (k,), ident, ident, "rate", "tap", bname))
        g.couplings.append(Coupling(g.fresh_name(f"c_{h}__{tap}"), h, tap,
                                    pre + [Dense(wname)], "tap", True))
        g.costs.append(Cost(g.fresh_name(f"{tap}.label"), tap, kind, "label",
                            float(opts.tap_weight), 1.0))
    return g


PASS = Pass("taps", transform, requires, ensures, enabled, "--taps")
run = PASS.run
