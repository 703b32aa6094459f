"""Hand-built energy-form graphs (what the compile pipeline produces), for tests and bench.

They let the runtime be tested on every coupling kind without going through a frontend:
an MLP, a conv net with max/avg pooling, a residual (Hopfield-ResNet style) net with an
identity skip, a net with an auxiliary error tap and one with teacher nodes. Weights follow
PyTorch's default initialisation (uniform in +-1/sqrt(fan_in)) from a seeded generator.
"""
from __future__ import annotations

import networkx as nx
import numpy as np

from epc.compiler.ir import (Activation, AvgPool, Conv, Coupling, Cost, Dense, Flatten, Graph,
                             Identity, Input, MaxPool, Schedule, State, Teacher)
from epc.compiler.verify import verify

CLIP = Activation.clip(0.0, 1.0)
LIN = Activation.identity()


def colour_classes(g: Graph) -> list[list[str]]:
    """Greedy colouring of the settled-state interaction graph, chains by layer parity."""
    settled = [s.name for s in g.settled_states()]
    ug = nx.Graph()
    ug.add_nodes_from(settled)
    ug.add_edges_from((c.src, c.dst) for c in g.couplings
                      if c.src in ug and c.dst in ug)
    col = nx.coloring.greedy_color(ug, strategy="largest_first")
    k = max(col.values()) + 1 if col else 0
    return [[s for s in settled if col[s] == i] for i in range(k)]


def _uniform(rng, shape, fan_in):
    b = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-b, b, size=shape).astype(np.float32)


def _finish(g: Graph, mode: str, max_sweeps: int, nudge_sweeps: int, tol: float) -> Graph:
    g.schedule = Schedule(mode=mode, classes=colour_classes(g), max_sweeps=max_sweeps,
                          nudge_sweeps=nudge_sweeps, tol=tol)
    return verify(g)


def mlp(sizes=(64, 256, 10), *, act: Activation = CLIP, cost: str = "mse", seed: int = 0,
        mode: str = "colour", max_sweeps: int = 100, nudge_sweeps: int = 40,
        tol: float = 1e-4, name: str = "mlp") -> Graph:
    rng = np.random.default_rng(seed)
    g = Graph(name, inputs=[Input("x", (sizes[0],))])
    prev = "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        s = "out" if last else f"h{i + 1}"
        g.weights[f"{s}.w"] = _uniform(rng, (b, a), a)
        g.weights[f"{s}.b"] = _uniform(rng, (b,), a)
        g.states.append(State(s, (b,), LIN if last else act, LIN if last else Activation.relu(),
                              role="output" if last else "hidden", bias=f"{s}.b"))
        g.couplings.append(Coupling(f"c_{s}", prev, s, [Dense(f"{s}.w")], "forward",
                                    feedback=prev != "x"))
        prev = s
    g.costs.append(Cost("label", "out", cost))
    return _finish(g, mode, max_sweeps, nudge_sweeps, tol)


def convnet(*, in_shape=(1, 8, 8), channels=(16, 32), classes: int = 10, pool: str = "max",
            act: Activation = CLIP, cost: str = "mse", seed: int = 0, mode: str = "colour",
            max_sweeps: int = 100, nudge_sweeps: int = 40, tol: float = 1e-4,
            name: str = "convnet") -> Graph:
    """conv3x3+pool2 per channel entry, then flatten+dense to a linear output."""
    rng = np.random.default_rng(seed)
    g = Graph(name, inputs=[Input("x", tuple(in_shape))])
    prev, shape = "x", tuple(in_shape)
    for i, ch in enumerate(channels):
        s = f"h{i + 1}"
        cin = shape[0]
        g.weights[f"{s}.w"] = _uniform(rng, (ch, cin, 3, 3), cin * 9)
        g.weights[f"{s}.b"] = _uniform(rng, (ch, 1, 1), cin * 9)
        p = MaxPool([2, 2], [2, 2]) if pool == "max" else AvgPool([2, 2], [2, 2])
        shape = (ch, shape[1] // 2, shape[2] // 2)
        g.states.append(State(s, shape, act, Activation.relu(), bias=f"{s}.b"))
        g.couplings.append(Coupling(f"c_{s}", prev, s, [Conv(f"{s}.w", pads=[1, 1, 1, 1]), p],
                                    "forward", feedback=prev != "x"))
        prev = s
    fan = int(np.prod(shape))
    g.weights["out.w"] = _uniform(rng, (classes, fan), fan)
    g.weights["out.b"] = _uniform(rng, (classes,), fan)
    g.states.append(State("out", (classes,), LIN, LIN, role="output", bias="out.b"))
    g.couplings.append(Coupling("c_out", prev, "out", [Flatten(), Dense("out.w")], "forward",
                                feedback=True))
    g.costs.append(Cost("label", "out", cost))
    return _finish(g, mode, max_sweeps, nudge_sweeps, tol)


def resnet(*, width: int = 64, blocks: int = 2, seed: int = 0, cost: str = "mse",
           mode: str = "colour", max_sweeps: int = 100, nudge_sweeps: int = 40,
           tol: float = 1e-4, name: str = "resnet") -> Graph:
    """Dense residual chain: h0 -> (h_{2k+1} -> h_{2k+2} with skip h_{2k} -> h_{2k+2})."""
    rng = np.random.default_rng(seed)
    g = Graph(name, inputs=[Input("x", (64,))])
    n = 1 + 2 * blocks
    prev = "x"
    for i in range(n):
        s = f"h{i}"
        fan = 64 if prev == "x" else width
        g.weights[f"{s}.w"] = _uniform(rng, (width, fan), fan)
        g.weights[f"{s}.b"] = _uniform(rng, (width,), fan)
        g.states.append(State(s, (width,), CLIP, Activation.relu(), bias=f"{s}.b"))
        g.couplings.append(Coupling(f"c_{s}", prev, s, [Dense(f"{s}.w")], "forward",
                                    feedback=prev != "x"))
        if i >= 2 and i % 2 == 0:
            g.couplings.append(Coupling(f"skip_{s}", f"h{i - 2}", s, [Identity()], "residual",
                                        feedback=True))
        prev = s
    g.weights["out.w"] = _uniform(rng, (10, width), width)
    g.weights["out.b"] = _uniform(rng, (10,), width)
    g.states.append(State("out", (10,), LIN, LIN, role="output", bias="out.b"))
    g.couplings.append(Coupling("c_out", prev, "out", [Dense("out.w")], "forward", feedback=True))
    g.costs.append(Cost("label", "out", cost))
    return _finish(g, mode, max_sweeps, nudge_sweeps, tol)


def with_tap(g: Graph, state: str = "h1", weight: float = 0.3, pool: bool = False) -> Graph:
    """Add an auxiliary error tap (optional global-average-pool + dense head) at `state`."""
    g = g.copy()
    rng = np.random.default_rng(123)
    shape = g.shape_of(state)
    ops = []
    if len(shape) == 3:
        from epc.compiler.ir import GlobalAvgPool
        ops = [GlobalAvgPool(keepdims=False)] if pool else [Flatten()]
        fan = shape[0] if pool else int(np.prod(shape))
    else:
        fan = shape[0]
    g.weights["tap.w"] = _uniform(rng, (10, fan), fan)
    g.states.append(State("tap", (10,), LIN, LIN, role="tap"))
    g.couplings.append(Coupling("c_tap", state, "tap", ops + [Dense("tap.w")], "tap",
                                feedback=True))
    g.costs.append(Cost("tap_cost", "tap", "mse", weight=weight))
    return _finish(g, g.schedule.mode, g.schedule.max_sweeps, g.schedule.nudge_sweeps,
                   g.schedule.tol)


def with_teacher(g: Graph, mix: float = 0.5, temperature: float = 4.0) -> Graph:
    """Add a frozen teacher copy of the net (feedforward, source activations) and a KL cost."""
    g = g.copy()
    tmap = {}
    for s in list(g.states):
        if s.role in ("hidden", "output"):
            t = f"t.{s.name}"
            tmap[s.name] = t
            b = None
            if s.bias:
                b = f"t.{s.bias}"
                g.weights[b] = g.weights[s.bias].copy()
            g.states.append(State(t, s.shape, s.source_act, s.source_act, role="teacher", bias=b))
    for c in list(g.couplings):
        if c.kind in ("forward", "residual") and c.dst in tmap:
            import copy as _copy
            ops = _copy.deepcopy(c.ops)
            for op in ops:
                if hasattr(op, "weight"):
                    nw = f"t.{op.weight}"
                    g.weights.setdefault(nw, g.weights[op.weight].copy())
                    op.weight = nw
            g.couplings.append(Coupling(f"t.{c.name}", tmap.get(c.src, c.src), tmap[c.dst], ops,
                                        "teacher", feedback=False))
    out = g.output_state().name
    for c in g.costs:
        if c.state == out and c.target == "label":
            c.weight = 1.0 - mix
    g.costs.append(Cost("distill", out, "kl", target=tmap[out], weight=mix,
                        temperature=temperature))
    g.teacher = Teacher("teacher", "source", tmap[out], temperature, mix)
    return _finish(g, g.schedule.mode, g.schedule.max_sweeps, g.schedule.nudge_sweeps,
                   g.schedule.tol)
