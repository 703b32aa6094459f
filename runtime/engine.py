"""The runtime's hot loop: batched settling of an energy-form graph.

An `Engine` is built once from an energy `Graph` (weights become torch tensors on the
chosen device). It precomputes, for every settled state, the couplings that drive it
forward and the couplings whose tied transpose feeds back into it, so one update is a short
list of matmuls / convolutions with no graph walking and no autograd:

    s_j <- act_j( sum_{c: dst=j} L_c(s_src) + sum_{c: src=j, feedback} L_c^T(s_dst) + b_j
                  - beta * sum_{costs on j} weight * dC/ds_j )

Dense couplings (optionally after a flatten) run as plain matmuls; other chains go through
`runtime.kernels.chain_forward` (the reference ops, with faster equal kernels where torch's
are slow) and `compiler.ops.chain_adjoint`, whose contexts (e.g. max-pool argmax) are
cached per coupling and reused while the source state has not changed. Terms that only
depend on clamped inputs (input couplings, biases) are computed once per batch.

A readout head (`epc compile --readout`) is outside the energy: it is updated as its
inbound couplings' value plus bias, never nudged itself, and each of its costs nudges the
states feeding it through the couplings' adjoints, evaluated at the current states:

    s_j <- act_j( ... - beta * sum_{readouts r fed by j} L_r^T( weight * dC/do_r ) ),
    o_r = sum_{c: dst=r} L_c(s_src) + b_r

Image states ([C, H, W]) live channels-last on CPU (`channels_last`, on by default there):
oneDNN's convolutions and torch's max-pool kernels vectorise over channels in that layout,
and keeping the states in it removes the layout conversions each pool otherwise pays for
(conv_digits: a free sweep with live max-pools ~15% faster). Results equal the NCHW
layout's up to the order of the float sums inside the convolutions.

Settling follows the compiled schedule: colour classes updated in order (block
Gauss-Seidel, the default) or all states at once from the previous sweep ('sync'). It stops
when every sample's largest state change in a sweep is below `tol`, or at the sweep cap,
and reports how many samples had not converged. The walk itself (classes, residual,
convergence, caps, max-pool freezing, parts that stop on their own) is runtime/settle.py,
shared with the integer simulator; this module plugs in the float arithmetic
(`FloatSettle`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import math

import networkx as nx
import numpy as np
import torch

from epc.compiler import ops as O
from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph, op_weights

from . import kernels as K
from . import spikes as SP
from .settle import DeferredStops, settle_walk

Tensor = torch.Tensor
EXPLODE = 1e6   # |state| above this in an unbounded state counts as divergence
# --precision: the dtype of the settle loop's states and weights (None: the engine's dtype)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_TOL = -1.0   # the tolerance of a stochastic phase: none (it runs all its time steps)


def schedule_mode(mode: str | None) -> str | None:
    """A `--schedule` value as the runtime names it: 'color' is taken for 'colour' (as
    `epc compile` takes it); anything else unchanged, for the caller to check."""
    return "colour" if mode == "color" else mode


@dataclass
class Link:
    """A coupling prepared for the hot loop."""

    name: str
    src: str
    dst: str
    ops: list
    kind: str
    feedback: bool
    fast: str          # 'dense' | 'flat_dense' | 'identity' | 'chain'
    weight: str | None  # the dense weight for the fast paths
    src_shape: tuple
    needs_ctx: bool     # the adjoint depends on the source value (max-pool argmax)
    weights: list[str] = field(default_factory=list)


@dataclass
class SettleResult:
    states: dict[str, Tensor]
    sweeps: int
    residual: Tensor            # per-sample largest state change in the last sweep
    unconverged: int            # samples whose residual is above tol
    trace: list[dict] | None = None   # per sweep: residual (max), energy (mean) if asked
    routing: dict | None = None       # max-pool selections in force at the end (if frozen)
    parts: list | None = None         # per-part results when settled with `parts`
    # bernoulli graphs (runtime/spikes.py): `states` is the mean over the phase's last
    # half; `carry` what a phase continuing this one starts from (the states at the last
    # step, the window averaging's spike history); `recorded` (with `record`) the spike
    # trains of the averaged steps (per step: bernoulli states' spikes, others' values)
    carry: dict | None = None
    recorded: list[dict] | None = None


# Chains the hot loop runs in a special form (the same arithmetic in fewer calls), by the
# kinds of their ops; every other chain runs op by op through the registry ('chain').
_FAST_PATHS = {("dense",): "dense", ("flatten", "dense"): "flat_dense"}


def _fast_path(ops: list) -> tuple[str, str | None]:
    """(fast path, its dense weight) of a coupling's chain."""
    kinds = tuple(op.kind for op in ops)
    if kinds in _FAST_PATHS:
        return _FAST_PATHS[kinds], ops[-1].weight
    if all(k == "identity" for k in kinds):
        return "identity", None
    return "chain", None


class Engine:
    """Settling, costs and Phi for one energy graph on one device."""

    def __init__(self, graph: Graph, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, mode: str | None = None,
                 pool_freeze: int | None = 20, channels_last: bool | None = None,
                 feedback_gain: dict[str, float] | None = None,
                 precision: str = "fp32"):
        if not graph.is_energy:
            raise EpcError(f"graph {graph.name} is not in energy form; compile it first "
                           f"(epc compile MODEL --target torch)")
        if graph.schedule is None:
            raise EpcError(f"graph {graph.name} has no schedule; compile it with epc compile")
        self.graph = graph
        self.pool_freeze = pool_freeze   # default `freeze_after` of every settle
        self.device = torch.device(device)
        self.dtype = dtype
        if precision not in PRECISIONS:
            raise EpcError(f"bad --precision {precision!r} (supported: "
                           f"{', '.join(PRECISIONS)})")
        if PRECISIONS[precision] is not None and dtype != torch.float32:
            raise EpcError(f"--precision {precision} settles a float32 engine in 16 bits; "
                           f"this engine is {dtype}")
        self.precision = precision
        # the settle loop's states and weights in 16 bits (None: in dtype, as always)
        self.low = PRECISIONS[precision]
        sched = graph.schedule
        self.mode = schedule_mode(mode) or sched.mode
        if self.mode not in ("colour", "sync"):
            raise EpcError(f"unknown schedule mode {self.mode!r} (supported: colour, sync)")
        self.max_sweeps, self.nudge_sweeps = sched.max_sweeps, sched.nudge_sweeps
        self.tol = sched.tol
        self.params: dict[str, Tensor] = {
            k: torch.as_tensor(np.asarray(v), dtype=dtype, device=self.device).clone()
            for k, v in graph.weights.items()}
        frozen = {w for c in graph.couplings if c.kind == "teacher" for op in c.ops
                  for w in op_weights(op).values()}
        frozen |= {s.bias for s in graph.states if s.role == "teacher" and s.bias}
        self.learnable = [w for w in graph.weight_names() if w not in frozen]
        self.inputs = [i.name for i in graph.inputs]
        self.input_shapes = {i.name: tuple(i.shape) for i in graph.inputs}
        self.states = {s.name: s for s in graph.states}
        self.settled = [s.name for s in graph.settled_states()]
        self.output = graph.output_state().name
        self.shapes = {s.name: tuple(s.shape) for s in graph.states}
        self.shapes.update(self.input_shapes)
        # per-sample size of each settled state: its columns in settle's residual buffer
        self.widths = {j: math.prod(self.shapes[j]) for j in self.settled}
        # None: channels-last image states on CPU (see the module docstring); on CUDA
        # the layout is left to the caller until it has been measured there
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        self.channels_last = frozenset(
            j for j in self.settled if channels_last and len(self.shapes[j]) == 3)
        self.classes = [list(c) for c in sched.classes if c]
        self._prepare_links(graph)
        self._prepare_gains(graph, feedback_gain)
        self._wire_links(graph)
        self._prepare_costs(graph)
        self.num_classes = int(np.prod(self.shapes[self.output]))
        # data-parallel runs (runtime/distributed.py): each process settles its shard of one
        # batch, and the batch stops when all of it has settled, so a stop is decided on
        # the largest changes over the processes: `stop_sync` maps a tensor of this
        # process's values to their maxima over the processes (None: one process, the batch
        # is all here). The settles defer those decisions (runtime/settle.py, `_stops`).
        self.stop_sync = None
        self._stops: DeferredStops | None = None
        self._prepare_spiking(graph)

    def _prepare_spiking(self, graph: Graph) -> None:
        """Bernoulli states (runtime/spikes.py): each phase runs exactly its time steps
        (no tolerance); spikes draw from `noise_gen` unless a settle is given its own."""
        self.bernoulli = frozenset(j for j in self.settled
                                   if self.states[j].neuron == "bernoulli")
        self.stochastic = bool(self.bernoulli)
        self.spiking = graph.schedule.spiking if self.stochastic else None
        self._fanouts = None
        if not self.stochastic:
            return
        if self.spiking is None:
            raise EpcError(f"graph {graph.name} has bernoulli states but its schedule has no "
                           f"time steps; compile it with epc compile")
        if self.low is not None:
            raise EpcError(f"--precision {self.precision} applies to rate neurons; graph "
                           f"{graph.name}'s bernoulli neurons settle in fp32")
        self.max_sweeps = self.spiking.time_steps
        self.nudge_sweeps = self.spiking.nudge_time_steps
        self.tol = NO_TOL
        self.noise_gen = SP.generator(self.device, 0)

    def multiply_adds(self) -> tuple[int, int]:
        """Multiply-accumulates per sample of one free phase: (once: the couplings read
        from clamped inputs, whose drive is computed once per phase; per sweep: those read
        from rate states, forward and through their feedback). Couplings read from
        bernoulli states are synaptic events instead (runtime/spikes.py)."""
        once = per_sweep = 0
        W = self.graph.weights
        for l in self.links:
            if l.kind == "teacher":
                continue
            m = sum(O.chain_macs(l.ops, tuple(self.shapes[l.src]), W))
            if l.src not in self.settled:
                once += m
            elif l.src not in self.bernoulli:
                per_sweep += m
            if l.feedback and l.src in self.settled and l.dst not in self.bernoulli:
                per_sweep += m
        return once, per_sweep

    def spike_fanouts(self):
        """(per bernoulli state its units' synapse counts, the pooled links): see
        runtime/spikes.py; computed once, from the weights' shapes."""
        if self._fanouts is None:
            self._fanouts = SP.fanouts(self)
        return self._fanouts

    def _prepare_links(self, graph: Graph) -> None:
        """Every coupling as a Link: its fast path, whether its contexts follow the source
        (max-pools), its weights; and the conv kernels the loop keeps channels-last."""
        self.links: list[Link] = []
        for c in graph.couplings:
            fast, w = _fast_path(c.ops)
            self.links.append(Link(
                c.name, c.src, c.dst, list(c.ops), c.kind, bool(c.feedback), fast, w,
                tuple(graph.shape_of(c.src)), any(K.rule(op).piecewise for op in c.ops),
                [x for op in c.ops for x in op_weights(op).values()]))
        self.link_by_name = {l.name: l for l in self.links}
        # convolution kernels (the 4-D weights) that act on channels-last states in the
        # loop (see loop_params)
        self.cl_kernels = sorted({w for l in self.links if l.fast == "chain"
                                  and {l.src, l.dst} & self.channels_last
                                  for w in l.weights if np.ndim(graph.weights[w]) == 4})

    def _prepare_gains(self, graph: Graph, override: dict[str, float] | None) -> None:
        """Feedback regulation: the tied transpose of coupling c drives its source scaled
        by its feedback_gain (the IR's; `override` replaces some, by coupling name). With
        gains the settling is no gradient flow of E in s but of an energy in rescaled
        states (feedback_scales). Only the gains != 1 are kept."""
        gains = {c.name: float(c.feedback_gain) for c in graph.couplings}
        for k, v in (override or {}).items():
            if k not in self.link_by_name:
                raise EpcError(f"feedback gain for unknown coupling {k}")
            gains[k] = float(v)
        self.feedback_gain = {k: g for k, g in gains.items() if g != 1.0}

    def feedback_scales(self) -> dict[str, float] | None:
        """a_j^2 per settled state when feedback gains are set (None without gains).

        With gain g_c on the feedback of two-way coupling c (src -> dst), the settling is
        the gradient flow of a symmetric energy in t_j = s_j / a_j, with a_src^2 = g_c a_dst^2
        along every two-way coupling and a_out = 1: weights sqrt(g_c) W_c, bounds hi_j / a_j,
        the nudge unchanged at the output. Fixed by a walk from the output state; a state
        the walk does not reach keeps a = 1. Gains that disagree around a loop of two-way
        couplings leave no such energy: EpcError."""
        if not self.feedback_gain:
            return None
        g = nx.Graph()
        g.add_nodes_from(self.settled)
        for l in self.links:
            if l.feedback and l.src in self.inbound and l.dst in self.inbound:
                g.add_edge(l.src, l.dst, link=l)
        a2 = {self.output: 1.0}
        for u, v in nx.bfs_edges(g, self.output):
            l = g.edges[u, v]["link"]
            gain = self.feedback_gain.get(l.name, 1.0)
            a2[v] = gain * a2[u] if v == l.src else a2[u] / gain
        for _, _, d in g.edges(data=True):
            l = d["link"]
            want = self.feedback_gain.get(l.name, 1.0) * a2[l.dst]
            if abs(a2[l.src] - want) > 1e-9 * max(a2[l.src], want):
                raise EpcError(f"feedback gains disagree around a loop through coupling "
                               f"{l.name}: no rescaled energy exists")
        return {j: a2.get(j, 1.0) for j in self.settled}

    def _wire_links(self, graph: Graph) -> None:
        """Per settled state: the links that drive it from clamped values (computed once
        per batch), from settled states, and the links whose transpose feeds back into
        it; per teacher state its links, and the teacher states in feedforward order."""
        teacher_states = {s.name for s in graph.states if s.role == "teacher"}
        clamped = set(self.inputs) | teacher_states
        self.input_links: dict[str, list[Link]] = {j: [] for j in self.settled}
        self.inbound: dict[str, list[Link]] = {j: [] for j in self.settled}
        self.feedback: dict[str, list[Link]] = {j: [] for j in self.settled}
        self.teacher_links: dict[str, list[Link]] = {j: [] for j in teacher_states}
        for l in self.links:
            if l.dst in teacher_states:
                self.teacher_links[l.dst].append(l)
                continue
            if l.src in teacher_states:
                raise EpcError(f"coupling {l.name}: a teacher state ({l.src}) may only feed "
                               f"teacher states and costs")
            (self.input_links if l.src in clamped else self.inbound)[l.dst].append(l)
            if l.feedback and l.src not in clamped:
                self.feedback[l.src].append(l)
        dg = nx.DiGraph()
        dg.add_nodes_from(teacher_states)
        dg.add_edges_from((l.src, l.dst) for j in teacher_states for l in self.teacher_links[j]
                          if l.src in teacher_states)
        self.teacher_order = list(nx.topological_sort(dg))

    def _prepare_costs(self, graph: Graph) -> None:
        """Costs per state, activations, and the readout heads (outside the energy) with,
        per settled state, the links into them through which their costs nudge it."""
        self.costs = {j: [c for c in graph.costs if c.state == j] for j in self.settled}
        self.cost_list = list(graph.costs)
        for c in self.cost_list:
            if c.state not in self.states or self.states[c.state].role == "teacher":
                raise EpcError(f"cost {c.name}: state {c.state} is not a settled state")
        self.acts = {j: self.states[j].act for j in self.states}
        self.readouts = [j for j in self.settled if self.states[j].readout]
        self.is_readout = frozenset(self.readouts)
        self.readout_links: dict[str, list[Link]] = {j: [] for j in self.settled}
        for r in self.readouts:
            for l in self.inbound[r]:
                if l.src in self.is_readout:
                    raise EpcError(f"coupling {l.name}: readout {l.src} feeds readout {r}")
                self.readout_links[l.src].append(l)

    # ------------------------------------------------------------------ coupling maps
    def link_forward(self, l: Link, x: Tensor, P: dict | None = None, routing: dict | None = None):
        P = self.params if P is None else P
        if routing is not None and l.name in routing:
            return self._routed_forward(l.ops, x, P, routing[l.name])
        if l.fast == "dense":
            return x @ P[l.weight].t(), None
        if l.fast == "flat_dense":
            return x.reshape(x.shape[0], -1) @ P[l.weight].t(), None
        if l.fast == "identity":
            return x, None
        return K.chain_forward(l.ops, x, P)

    def _routed_forward(self, ops: list, x: Tensor, P: dict, frozen: list):
        """The chain `ops` (a link's ops or a prefix of them) with every piecewise op (a
        max-pool) selecting as frozen in `frozen` (a linear map)."""
        ctxs = []
        for op, fc in zip(ops, frozen):
            r = K.rule(op)
            x, c = r.forward(op, x, P) if fc is None else r.forward_frozen(op, x, fc)
            ctxs.append(c)
        return x, ctxs

    def link_prefix(self, l: Link, x: Tensor, P: dict | None = None,
                    routing: dict | None = None) -> tuple[Tensor, list]:
        """A chain link applied up to, not including, its last op: the value that op takes
        and the contexts of the ops before it (max-pools as `routing` froze them)."""
        P = self.params if P is None else P
        if routing is not None and l.name in routing:
            return self._routed_forward(l.ops[:-1], x, P, routing[l.name])
        return K.chain_forward(l.ops[:-1], x, P)

    def link_contexts(self, l: Link, x: Tensor, P: dict | None = None,
                      routing: dict | None = None) -> list:
        """The contexts `link_adjoint` takes for a chain link at source value x, as
        `link_forward` returns them. A trailing conv or dense op is not applied: its
        context is only its input's shape (a conv) or nothing (a dense), so the contexts
        of a max-pool -> conv chain cost the pool, not the convolution too (likewise any
        last op whose context is not `context_needs_input`)."""
        last = K.rule(l.ops[-1])
        if last.context_needs_input:
            return self.link_forward(l, x, P, routing)[1]
        y, ctxs = self.link_prefix(l, x, P, routing)
        return ctxs + [last.shape_context(l.ops[-1], y.shape)]

    def routing(self, states: dict, batch: dict) -> dict:
        """Max-pool selections of every pooling chain at `states` (to freeze for nudging)."""
        vals = dict(batch["clamped"])
        vals.update(states)
        out = {}
        for l in self.links:
            if l.needs_ctx and l.dst in self.inbound:
                ctxs = self.link_contexts(l, vals[l.src])
                # per op: its frozen selection (piecewise ops), else None
                out[l.name] = [K.rule(op).freeze(op, c) if K.rule(op).piecewise else None
                               for op, c in zip(l.ops, ctxs)]
        return out

    def readout(self, r: str, vals: dict, P: dict | None = None,
                routing: dict | None = None) -> Tensor:
        """A readout head's value: its inbound couplings (from states and inputs, read from
        `vals`) plus its bias, differentiable in `P`. (The settle loop keeps its own form:
        input drive and bias precomputed, the couplings' contexts kept for the adjoint.)"""
        P = self.params if P is None else P
        o = sum(self.link_forward(l, vals[l.src], P, routing)[0]
                for l in self.input_links[r] + self.inbound[r])
        b = self.states[r].bias
        return o + P[b] if b else o

    def link_adjoint(self, l: Link, g: Tensor, ctx, P: dict | None = None) -> Tensor:
        P = self.params if P is None else P
        if l.fast == "dense":
            return g @ P[l.weight]
        if l.fast == "flat_dense":
            return (g @ P[l.weight]).reshape((g.shape[0],) + l.src_shape)
        if l.fast == "identity":
            return g
        return K.chain_adjoint(l.ops, g, ctx, P)

    def _shape_ctx(self, l: Link, n: int):
        """Contexts of a chain whose adjoint depends only on shapes (computed on zeros; a
        trailing conv or dense op is not applied, see `link_contexts`)."""
        x = torch.zeros((n,) + l.src_shape, dtype=self.dtype, device=self.device)
        return self.link_contexts(l, x)

    # ------------------------------------------------------------------ batch setup
    def prepare(self, inputs: dict[str, Tensor] | Tensor) -> dict:
        """Per-batch constants: clamped inputs, teacher states, input drive and biases."""
        if isinstance(inputs, Tensor):
            if len(self.inputs) != 1:
                raise EpcError(f"graph has inputs {self.inputs}; pass a dict")
            inputs = {self.inputs[0]: inputs}
        vals = {k: v.to(self.device, self.dtype) for k, v in inputs.items()}
        n = next(iter(vals.values())).shape[0]
        P = self.params
        for j in self.teacher_order:
            u = None
            for l in self.teacher_links[j]:
                y = self.link_forward(l, vals[l.src])[0]
                u = y if u is None else u + y
            b = self.states[j].bias
            if b:
                u = P[b].expand((n,) + self.shapes[j]) if u is None else u + P[b]
            vals[j] = O.activate(self.acts[j], u)
        const = {}
        for j in self.settled:
            u = torch.zeros((n,) + self.shapes[j], dtype=self.dtype, device=self.device)
            for l in self.input_links[j]:
                u = u + self.link_forward(l, vals[l.src])[0]
            b = self.states[j].bias
            if b:
                u = u + P[b]
            const[j] = self.to_layout(j, u)
        return {"clamped": vals, "const": const, "n": n}

    def zeros(self, n: int) -> dict[str, Tensor]:
        return {j: self.to_layout(j, torch.zeros((n,) + self.shapes[j], dtype=self.dtype,
                                                 device=self.device))
                for j in self.settled}

    def loop_params(self, P: dict) -> dict:
        """P with the convolution kernels of chains that touch a channels-last state made
        channels-last (differentiably: autograd may run through a settle)."""
        if not self.cl_kernels:
            return P
        out = dict(P)
        for w in self.cl_kernels:
            out[w] = P[w].contiguous(memory_format=torch.channels_last)
        return out

    def to_layout(self, j: str, v: Tensor) -> Tensor:
        """State j's values in the memory layout the settle loop keeps it in."""
        if j in self.channels_last:
            return v.contiguous(memory_format=torch.channels_last)
        return v

    # ------------------------------------------------------------------ costs
    def cost_target(self, c, batch: dict, labels: Tensor | None) -> Tensor:
        if c.target == "label":
            if labels is None:
                raise EpcError(f"cost {c.name} needs labels")
            shape = self.shapes[c.state]
            k = math.prod(shape)
            return torch.nn.functional.one_hot(labels.to(self.device), k).to(self.dtype) \
                .reshape((labels.shape[0],) + shape)
        return batch["clamped"][c.target]

    def cost_grad(self, c, s: Tensor, t: Tensor) -> Tensor:
        """dC/ds for one cost term (per sample)."""
        if c.kind == "mse":
            return s - t
        n = s.shape[0]
        s2, t2 = s.reshape(n, -1), t.reshape(n, -1)
        if c.kind == "ce":
            return (torch.softmax(s2, 1) - t2).reshape(s.shape)
        if c.kind == "kl":
            T = c.temperature
            return (T * (torch.softmax(s2 / T, 1) - torch.softmax(t2 / T, 1))).reshape(s.shape)
        raise EpcError(f"cost {c.name}: unknown kind {c.kind}")

    def cost_value(self, c, s: Tensor, t: Tensor) -> Tensor:
        """C per sample."""
        n = s.shape[0]
        s2, t2 = s.reshape(n, -1), t.reshape(n, -1)
        if c.kind == "mse":
            return 0.5 * ((s2 - t2) ** 2).sum(1)
        if c.kind == "ce":
            return -(t2 * torch.log_softmax(s2, 1)).sum(1)
        T = c.temperature
        pt = torch.softmax(t2 / T, 1)
        return T * T * (pt * (torch.log(pt.clamp_min(1e-30)) - torch.log_softmax(s2 / T, 1))).sum(1)

    def loss(self, states: dict, batch: dict, labels: Tensor | None) -> Tensor:
        """L = sum over costs of weight * C, per sample."""
        total = 0.0
        for c in self.cost_list:
            total = total + c.weight * self.cost_value(c, states[c.state],
                                                       self.cost_target(c, batch, labels))
        return total

    # ------------------------------------------------------------------ energy
    def phi(self, states: dict, batch: dict, P: dict | None = None,
            per_sample: bool = False, routing: dict | None = None,
            two_way_only: bool = False, updating: set | None = None) -> Tensor:
        """Phi over settled couplings and biases (summed over the batch unless per_sample).

        `updating` (runtime/gradcheck.py): the states of one colour block. A coupling with
        a feedback gain whose source is among them enters scaled by the gain, so that the
        derivative w.r.t. those states is the drive the settle loop applies (no coupling
        joins two states of one block). With gains the loop is no gradient flow of Phi.

        `two_way_only` leaves out the couplings without feedback (inputs' couplings, and all
        of them under `--no-feedback`): such a coupling drives its destination and nothing
        drives back, which no energy term expresses, so a caller that differentiates Phi
        for the settle loop's drives adds their values itself (runtime/gradcheck.py).
        """
        P = self.params if P is None else P
        vals = dict(batch["clamped"])
        vals.update(states)
        n = batch["n"]
        total = torch.zeros(n, dtype=self.dtype, device=self.device)
        for j in self.settled:
            if j in self.is_readout:      # outside the energy
                continue
            for l in self.input_links[j] + self.inbound[j]:
                if two_way_only and not l.feedback:
                    continue
                y = self.link_forward(l, vals[l.src], P, routing)[0]
                if updating is not None and l.src in updating and l.name in self.feedback_gain:
                    # differentiated w.r.t. its source alone (a block of a colour sweep),
                    # the term gives the drive the loop applies: feedback times the gain
                    y = y * self.feedback_gain[l.name]
                total = total + (vals[j] * y).reshape(n, -1).sum(1)
            b = self.states[j].bias
            if b:
                total = total + (vals[j] * P[b]).reshape(n, -1).sum(1)
        return total if per_sample else total.sum()

    def energy(self, states: dict, batch: dict, routing: dict | None = None) -> Tensor:
        """E per sample."""
        n = batch["n"]
        sq = sum(0.5 * (states[j] ** 2).reshape(n, -1).sum(1) for j in self.settled
                 if j not in self.is_readout)
        return sq - self.phi(states, batch, per_sample=True, routing=routing)

    # ------------------------------------------------------------------ settling
    def settle(self, batch: dict, states: dict | None = None, *, beta: float = 0.0,
               labels: Tensor | None = None, max_sweeps: int | None = None,
               tol: float | None = None, mode: str | None = None,
               trace: bool = False, routing: dict | None = None,
               freeze_after: int | None | str = "auto",
               parts: list[slice] | None = None, gen: torch.Generator | None = None,
               noise: "SP.Noise | None" = None, carry: dict | None = None,
               record: bool = False, counts: "SP.SpikeCounts | None" = None) -> SettleResult:
        """Settle from `states` (zeros if None) at nudging strength `beta`: the shared settle
        walk (runtime/settle.py) with this engine's float arithmetic (`FloatSettle`).

        A graph with bernoulli states (runtime/spikes.py) runs exactly `max_sweeps` time
        steps (default: its free or nudged time steps, by beta), with no tolerance (`tol`
        is not used); its spikes draw from `gen` (default: the engine's own generator,
        which runs on across settles) or `noise`. The result's states are the mean over
        the phase's last half (`SpikeCounts` docs: the phase's estimate). `carry`, a
        previous result's `carry`, continues that phase: the settle starts from its last
        step (`states` is not used) with its window history; `record` keeps the spike
        trains of the averaged steps (result.recorded); `counts` adds the phase's spikes
        and synaptic events to a SpikeCounts.

        `parts` (used by settle_pair): consecutive slices covering the batch, in order,
        that stop independently: each
        part's states are taken at the first sweep where that part has settled, exactly
        as a settle of that part alone would end, and its rows leave the batch; the
        result's `parts` holds the per-part results (its own `states` and `residual` are
        not assembled: empty and None).

        `routing` (from `Engine.routing` at the free fixed point) freezes every max-pool's
        selection, so the nudged phases settle a bilinear energy: the piece of the
        piecewise-linear max-pool that the free equilibrium lies on. Without it, a pool
        window with tied values (all-zero regions of clipped states are common) may pick
        different winners at +beta and -beta and the EP difference quotient jumps.

        `freeze_after`: if the phase has not settled after this many sweeps, freeze the
        max-pool selections at the current state and go on. A max-pool applied to a state
        makes Phi non-bilinear in that state: where a pool's winner receives negative
        feedback, block updates that route to the current argmax make the winner swap back
        and forth and never settle; with the selections frozen the energy is bilinear and
        every block update is exact again. A stochastic phase never settles, so it never
        freezes by sweep count ('auto'): a freeze after N time steps would always fire, at
        an early, noisy estimate in the middle of the transient (conv_digits, 5 epochs:
        65.3% freezing at step 20, 70.3% at 32, 75.6% never); its nudged phases take the
        winners of the free phase's averaged states (the trainer's `routing`).
        """
        mode = mode or self.mode
        nudged = torch.is_tensor(beta) or beta != 0.0
        if max_sweeps is None:
            max_sweeps = self.nudge_sweeps if self.stochastic and nudged else self.max_sweeps
        tol = self.tol if tol is None or self.stochastic else tol
        if freeze_after == "auto":
            freeze_after = None if self.stochastic else self.pool_freeze
        if self.stochastic and carry is not None:
            states = carry["states"]
        S = dict(self.zeros(batch["n"]) if states is None else states)
        if self.low is not None:
            # 16-bit settling (FloatSettle): states and the loop's weights in `low`. A
            # state resolves changes down to one ulp, so a phase has settled once none
            # moves by more than tol plus an ulp of a unit-sized state (bf16 2^-7, fp16
            # 2^-10): below that 16-bit states can move by an ulp for ever.
            tol = tol + torch.finfo(self.low).eps
            S = {j: v.to(self.low) for j, v in S.items()}
        run = FloatSettle(self, batch, S, beta, labels, routing, trace, parts is not None)
        if self.stochastic:
            run.spiking(S, noise or SP.Noise(gen or self.noise_gen), carry, record, counts,
                        max_sweeps)
        # the max-pool selections freeze once, unless they came frozen
        pooled = any(l.needs_ctx for l in self.links)
        freeze_at = freeze_after if routing is None and pooled else None
        stops = self.deferred_stops()
        sweeps = settle_walk(run, S, self.classes if mode == "colour" else [self.settled],
                             max_sweeps=max_sweeps, tol=tol, freeze_at=freeze_at,
                             units=_part_sizes(parts, batch["n"]),
                             observe=run.observe if trace or self.stochastic else None,
                             stops=stops, kind=(parts is not None, run.nudged))
        return run.result(sweeps, tol)

    def deferred_stops(self) -> DeferredStops | None:
        """The stop decisions' state for `stop_sync` (None in one process): kept while the
        same reduction is attached, since its plan learns from earlier settles."""
        if self.stop_sync is None:
            return None
        if self._stops is None or self._stops.reduce is not self.stop_sync:
            self._stops = DeferredStops(self.stop_sync)
        return self._stops

    def _routing_rows(self, routing: dict | None, take) -> dict | None:
        """Frozen max-pool selections with `take` applied to their batch rows."""
        if routing is None:
            return None
        return {name: [None if fc is None else K.rule(op).take_frozen(fc, take)
                       for op, fc in zip(self.link_by_name[name].ops, frozen)]
                for name, frozen in routing.items()}

    def settle_pair(self, batch: dict, states: dict, *, beta: float, labels: Tensor,
                    max_sweeps: int | None = None, tol: float | None = None,
                    mode: str | None = None, routing: dict | None = None,
                    gen: torch.Generator | None = None, carry: dict | None = None,
                    record: bool = False, counts: "SP.SpikeCounts | None" = None
                    ) -> tuple[SettleResult, SettleResult]:
        """The +beta and -beta nudged phases of symmetric EP, settled as one batch of 2n.

        Each half makes exactly the updates its own `settle` would (the samples do not
        interact) and ends at the sweep where it alone would end (`parts`), so the two
        results equal two separate settles. On a CPU, small layers cost about the same per
        sweep at 2n as at n, so this saves time in the nudged phases; once one half has
        settled, the other goes on alone at n.

        Bernoulli graphs: the halves draw their spikes from `gen` (default: the engine's),
        both the same numbers under sampling 'shared' (so with `gen` the free phase's
        generator, both continue its stream), each their own under 'independent'; `carry`
        is the free phase's."""
        n = batch["n"]
        two = lambda t: torch.cat([t, t])   # noqa: E731
        b2 = {"n": 2 * n, "const": {k: two(v) for k, v in batch["const"].items()},
              "clamped": {k: two(v) for k, v in batch["clamped"].items()}}
        signs = torch.full((2 * n,), float(beta), dtype=self.dtype, device=self.device)
        signs[n:] = -float(beta)
        r2 = self._routing_rows(routing, two)
        noise = None
        if self.stochastic:
            noise = SP.Noise(gen or self.noise_gen,
                             2 if self.spiking.sampling == "shared" else 1)
        r = self.settle(b2, {j: two(v) for j, v in states.items() if j in self.settled},
                        beta=signs, labels=two(labels), max_sweeps=max_sweeps, tol=tol,
                        mode=mode, routing=r2, parts=[slice(0, n), slice(n, 2 * n)],
                        noise=noise, carry=_carry_rows(carry, two), record=record,
                        counts=counts)
        plus, minus = r.parts
        plus.routing = minus.routing = routing
        return plus, minus

    # ------------------------------------------------------------------ checks
    def check_finite(self, states: dict) -> str | None:
        """Name of the first state that holds NaN/Inf or exploded, else None."""
        # one reduction per state and one sync in the common case: every state fine
        peaks = torch.stack([states[j].detach().abs().amax() for j in self.settled]).tolist()
        if all(p <= EXPLODE or (self.acts[j].bounded and math.isfinite(p))
               for j, p in zip(self.settled, peaks)):
            return None
        for j in self.settled:
            v = states[j]
            if not torch.isfinite(v).all():
                return f"state {j} holds NaN/Inf"
            if not self.acts[j].bounded and float(v.abs().max()) > EXPLODE:
                return f"state {j} exploded (|s| = {float(v.abs().max()):.3g})"
        return None

    def predict(self, states: dict) -> Tensor:
        return states[self.output].reshape(states[self.output].shape[0], -1).argmax(1)

    # ------------------------------------------------------------------ weights
    def weights_numpy(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in self.params.items()}


# --------------------------------------------------------------------------- one settle
def _carry_rows(carry: dict | None, take) -> dict | None:
    """A settle's `carry` with `take` applied to its batch rows."""
    if carry is None:
        return None
    return {"step": carry["step"], "states": {j: take(v) for j, v in carry["states"].items()},
            "window": {j: [take(z) for z in zs] for j, zs in carry["window"].items()}}


def _part_sizes(parts: list[slice] | None, n: int) -> list[int] | None:
    """The row counts of `parts` (consecutive slices covering the batch in order)."""
    if parts is None:
        return None
    at = 0
    for sl in parts:
        if sl.start != at or sl.stop is None or sl.stop <= at or sl.step not in (None, 1):
            raise EpcError(f"settle parts must be consecutive slices covering the batch, "
                           f"got {parts}")
        at = sl.stop
    if at != n:
        raise EpcError(f"settle parts cover {at} rows of a batch of {n}")
    return [sl.stop - sl.start for sl in parts]


class FloatSettle:
    """The float arithmetic of one `Engine.settle` (what `runtime.settle.settle_walk`
    plugs in): the drive of each state, its per-batch constants and caches, the
    max-pool selections in force, and the results of the units that finished."""

    def __init__(self, eng: Engine, batch: dict, S: dict, beta, labels, routing, trace,
                 parts: bool):
        self.eng = eng
        self.parts = parts               # settled in parts (see Engine.settle)
        n = self.n = batch["n"]
        self.const, self.clamped = batch["const"], batch["clamped"]
        self.cur = batch                 # the batch restricted to the rows still settling
        self.routing = routing
        # beta: a number, or one per sample ([n] tensor, see settle_pair)
        self.nudged = torch.is_tensor(beta) or beta != 0.0
        self.targets, bview = {}, {}
        if self.nudged:
            for c in eng.cost_list:
                self.targets[c.name] = eng.cost_target(c, batch, labels)
            for j in eng.settled:
                bview[j] = (beta.reshape((n,) + (1,) * len(eng.shapes[j]))
                            if torch.is_tensor(beta) else beta)
        # beta * weight of every cost term, per state (constant over the sweeps)
        self.bw = {j: [bview[j] * c.weight for c in eng.costs[j]] for j in bview}
        self.ctx: dict[str, tuple[int, object]] = {}   # chain contexts, by source version
        self.shape_ctx: dict = {}                         # contexts that need only shapes
        P = self.P = eng.params
        self.low = eng.low
        if self.low is not None:
            # 16-bit settling: the loop's copy of the float32 weights (the optimiser's);
            # each drive is summed, nudged and activated in float32 and rounded once to a
            # state; the changes (the stop test) and the results are float32, so the EP
            # difference, the loss and the optimiser see float32
            P = self.P = {k: v.detach().to(self.low) for k, v in P.items()}
        # the transposed dense weights, taken once per settle rather than once per drive
        self.WT = {l.weight: P[l.weight].t() for l in eng.links if l.fast == "dense"}
        # the feedback weights as the drives apply them (scaled where a gain is set)
        self.FB = {l.name: (P[l.weight] * eng.feedback_gain[l.name] if l.name in
                            eng.feedback_gain else P[l.weight])
                   for l in eng.links if l.fast == "dense" and l.feedback}
        # the chains' weights as the loop applies them: with channels-last states, conv
        # kernels channels-last too (oneDNN converts an NCHW kernel on every call;
        # the results are the same bits)
        self.PL = eng.loop_params(P)
        # a drive accumulates into the fresh tensor its first term creates, in place (the
        # same operations without an allocation each: the allocations of 0.5 MB conv states
        # cost more than the arithmetic); not when autograd runs through the settling
        self.inplace = not (torch.is_grad_enabled() and any(
            t.requires_grad for t in (*S.values(), *self.clamped.values(), *P.values())))
        # (the fused multiply-adds need one dtype: in 16 bits the product is made in 16
        # bits and added to the float32 drive)
        self.fused = self.low is None
        self.detach = not self.inplace    # the residual is bookkeeping
        self.trace = [] if trace else None
        self.finished: dict[int, SettleResult] = {}
        self.compacted = False
        self.noise = None           # bernoulli graphs: see `spiking`

    def spiking(self, S0: dict, noise: "SP.Noise", carry: dict | None, record: bool,
                counts: "SP.SpikeCounts | None", steps: int) -> None:
        """Set up the bernoulli states of a stochastic graph (runtime/spikes.py): where
        spikes draw from, the window history a previous phase left (`carry`), whether to
        record the spike trains of the averaged steps, the counts to add to."""
        eng = self.eng
        sp = eng.spiking
        self.noise, self.counts = noise, counts
        self.inv_tau = 1.0 / sp.tau
        self.window = sp.averaging == "window"
        self.sweep, self.steps, self.record = 0, steps, bool(record)
        self.recorded: list[dict] = []
        # the result is the mean of the states over the last `avg` steps: the phase's
        # second half (its first is the transient from where it started)
        self.avg = SP.averaged_steps(steps)
        self.acc: dict[str, Tensor] = {}
        self.last_z: dict[str, Tensor] = {}
        # averaging 'window': per bernoulli state its last tau spikes (a ring, written at
        # position `step` mod tau); a phase that continues none starts the ring at the
        # states it starts from (zeros: no spikes yet), so the estimate is its mean
        self.step0 = 0 if carry is None else int(carry["step"])
        if self.window:
            self.hist = ({j: list(v) for j, v in carry["window"].items()} if carry is not None
                         else {j: [S0[j]] * sp.tau for j in sorted(eng.bernoulli)})

    def _spike(self, j: str, r: Tensor, p: Tensor) -> Tensor:
        """Bernoulli state j's new rate estimate: a spike drawn with probability p, then
        the trace or window update of the estimate r."""
        eng = self.eng
        z = self.noise.spikes(p)
        if self.window:
            k = (self.step0 + self.sweep) % len(self.hist[j])
            new = r + (z - self.hist[j][k]) * self.inv_tau
            self.hist[j][k] = z
        else:
            new = torch.lerp(r, z, self.inv_tau)
        self.last_z[j] = z
        if self.counts is not None:
            self.counts.add(j, z)
        return new

    # ---- the drive of one state
    def drive(self, j: str, S: dict, ver: dict) -> Tensor:
        eng, inplace = self.eng, self.inplace
        u = self.const[j]
        own = False     # u is this drive's own tensor (not const[j])
        for l in eng.inbound[j]:
            if l.fast == "dense" and self.fused:   # fused multiply-add: one kernel
                if own:
                    u.addmm_(S[l.src], self.WT[l.weight])
                else:
                    u, own = torch.addmm(u, S[l.src], self.WT[l.weight]), inplace
                continue
            y, cx = eng.link_forward(l, S[l.src], self.PL, self.routing)
            if l.fast == "chain":
                self.ctx[l.name] = (ver[l.src], cx)
            if own:
                u.add_(y)
            else:
                u, own = u + y, inplace
        for l in eng.feedback[j]:
            if l.fast == "dense" and self.fused:
                if own:
                    u.addmm_(S[l.dst], self.FB[l.name])
                else:
                    u, own = torch.addmm(u, S[l.dst], self.FB[l.name]), inplace
                continue
            cx = None
            if l.fast == "chain":
                if l.needs_ctx:
                    hit = self.ctx.get(l.name)
                    if hit is None or hit[0] != ver[j]:
                        hit = self.ctx[l.name] = (ver[j], eng.link_contexts(
                            l, S[j], self.PL, self.routing))
                    cx = hit[1]
                else:
                    cx = self.shape_ctx.get(l.name)
                    if cx is None:
                        cx = self.shape_ctx[l.name] = eng._shape_ctx(l, self.n)
            y = eng.link_adjoint(l, S[l.dst], cx, self.PL)
            if l.name in eng.feedback_gain:
                y = y * eng.feedback_gain[l.name]
            if own:
                u.add_(y)
            else:
                u, own = u + y, inplace
        if self.nudged:     # minus beta times the cost gradients on j
            if eng.readout_links[j]:
                u, own = self._readout_nudge(j, S, u, own)
            if j not in eng.is_readout:    # a readout is never nudged itself
                for c, f in zip(eng.costs[j], self.bw[j]):
                    y = f * eng.cost_grad(c, S[j], self.targets[c.name])
                    if own:
                        u.sub_(y)
                    else:
                        u, own = u - y, inplace
        v = O.activate_(eng.acts[j], u) if own else O.activate(eng.acts[j], u)
        if self.noise is not None and j in eng.bernoulli:
            return self._spike(j, S[j], v)
        return v if self.low is None else v.to(self.low)

    def _readout_nudge(self, j: str, S: dict, u: Tensor, own: bool) -> tuple[Tensor, bool]:
        """u minus beta times the cost gradients of the readout heads j feeds, through
        their couplings' adjoints."""
        eng, inplace = self.eng, self.inplace
        for l in eng.readout_links[j]:
            o, cxs = self._readout_value(l.dst, S)
            g = None
            for c, f in zip(eng.costs[l.dst], self.bw[l.dst]):
                y = f * eng.cost_grad(c, o, self.targets[c.name])
                g = y if g is None else g + y
            if g is None:
                continue
            y = eng.link_adjoint(l, g if self.low is None else g.to(self.low), cxs[l.name],
                                 self.PL)
            if own:
                u.sub_(y)
            else:
                u, own = u - y, inplace
        return u, own

    def _readout_value(self, r: str, S: dict) -> tuple[Tensor, dict]:
        """A readout's value at the current states, and its links' contexts."""
        o, cxs = self.const[r], {}
        for l in self.eng.inbound[r]:
            y, cxs[l.name] = self.eng.link_forward(l, S[l.src], self.PL, self.routing)
            o = o + y
        return o, cxs

    # ---- what the walk asks besides drives
    def delta_buffer(self, n: int):
        """Every state's change in a sweep lands in one [n, total] buffer; each state's
        columns are written in the state's own layout."""
        eng = self.eng
        buf = torch.zeros((n, sum(eng.widths.values())), dtype=eng.dtype, device=eng.device)
        cols, at = {}, 0
        for j in eng.settled:
            col = buf[:, at:at + eng.widths[j]]
            if j in eng.channels_last:
                c, h, w = eng.shapes[j]
                cols[j] = col.view(n, h, w, c).permute(0, 3, 1, 2)
            else:
                cols[j] = col.view((n,) + eng.shapes[j])
            at += eng.widths[j]
        return buf, cols

    def freeze(self, S: dict, units) -> None:
        self.routing = self.eng.routing(self.out(S), self.cur)
        self.ctx.clear()

    def observe(self, S: dict, rmax: float) -> None:
        if self.trace is not None:
            self.trace.append({"residual": rmax, "energy": float(
                self.eng.energy(self.out(S), self.cur, self.routing).mean())})
        if self.noise is None:
            return
        self.sweep += 1
        if self.sweep > self.steps - self.avg:
            for j in self.eng.settled:
                self.acc[j] = S[j] + self.acc[j] if j in self.acc else S[j].clone()
            if self.record:
                self.recorded.append({j: self.last_z.get(j, S[j]) for j in self.eng.settled})

    def out(self, S: dict) -> dict:
        """States as a settle hands them back: in the engine's dtype (float32 after a
        16-bit settle)."""
        if self.low is None:
            return S
        return {j: v.to(self.eng.dtype) for j, v in S.items()}

    def take_rows(self, take) -> None:
        if self.noise is not None:
            if self.window:
                self.hist = {j: [take(z) for z in zs] for j, zs in self.hist.items()}
            self.recorded = [{j: take(v) for j, v in rec.items()} for rec in self.recorded]
            self.acc = {j: take(v) for j, v in self.acc.items()}
        self.const = {j: take(v) for j, v in self.const.items()}
        self.clamped = {k: take(v) for k, v in self.clamped.items()}
        self.targets = {k: take(v) for k, v in self.targets.items()}
        self.bw = {j: [take(f) if torch.is_tensor(f) else f for f in fs]
                   for j, fs in self.bw.items()}
        self.routing = self.eng._routing_rows(self.routing, take)
        self.ctx.clear()
        self.shape_ctx.clear()
        self.n = next(iter(self.const.values())).shape[0]
        self.cur = {"n": self.n, "const": self.const, "clamped": self.clamped}
        self.compacted = True

    def finish(self, units, rows, sizes, S: dict, d: Tensor, sweeps: int, converged) -> None:
        """The units' results: views of their rows of the states and of |delta s| of
        their last sweep (the walk never writes into a state tensor, it replaces them);
        `unconverged` is counted in `result`."""
        S = self.out(S)
        if not self.parts:             # the whole batch, as it is
            self.finished[0] = SettleResult(S, sweeps, d.amax(1), 0, self.trace, self.routing)
            self._spiking_result(self.finished[0], lambda t: t)
            return
        at = 0
        for u, k in zip(units, sizes):
            sl = (slice(rows.start + at, rows.start + at + k) if isinstance(rows, slice)
                  else rows[at:at + k])
            take = ((lambda t, sl=sl: t[sl]) if isinstance(sl, slice)
                    else (lambda t, sl=sl: t.index_select(0, sl)))
            self.finished[int(u)] = SettleResult({j: take(v) for j, v in S.items()}, sweeps,
                                                 take(d).amax(1), 0, None, None)
            self._spiking_result(self.finished[int(u)], take)
            at += k

    def _spiking_result(self, r: SettleResult, take) -> None:
        """A unit's result (rows `take`) of a stochastic phase: its states the mean over
        the averaged steps; what continues it (the last step's states, the window
        history); the recorded spike trains."""
        if self.noise is None:
            return
        r.carry = {"step": self.step0 + self.sweep, "states": r.states,
                   "window": {j: [take(z) for z in zs] for j, zs in self.hist.items()}
                   if self.window else {}}
        if self.acc:
            k = 1.0 / min(self.avg, self.sweep)
            r.states = {j: take(v) * k for j, v in self.acc.items()}
        if self.record:
            r.recorded = [{j: take(v) for j, v in rec.items()} for rec in self.recorded]

    def result(self, sweeps: int, tol: float) -> SettleResult:
        # a stochastic phase has no tolerance: only rows that went non-finite count
        bad = ((lambda r: ~torch.isfinite(r)) if self.noise is not None
               else (lambda r: (r > tol).logical_or_(r.isnan())))
        if not self.parts:
            r = self.finished[0]
            r.unconverged = int(bad(r.residual).sum())
            return r
        got = [self.finished[i] for i in sorted(self.finished)]
        # the unconverged counts of all units with one sync
        counts = torch.stack([bad(p.residual).sum() for p in got]).tolist()
        for p, c in zip(got, counts):
            p.unconverged = int(c)
        # the whole batch's states are not assembled: callers of `parts` use the parts
        out = SettleResult({}, sweeps, None, sum(counts), self.trace,
                           None if self.compacted else self.routing)
        out.parts = got
        return out
