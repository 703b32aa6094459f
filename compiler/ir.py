"""The epc intermediate representation.

One `Graph` holds a network in one of two forms:

* **feedforward form** (what frontends produce): `inputs`, a topologically ordered list of
  `Node`s (one operation each: a linear op, a bias, a nonlinearity, an add, ...) and
  `outputs`.
* **energy form** (what `to_energy` produces): `inputs` are clamped, `states` are neuron
  populations, `couplings` are chains of linear ops between two states (each a bilinear
  term of the primitive function Phi), `costs` say what is nudged, an optional `teacher`
  and a `schedule` for settling.

Node kinds are small dataclasses whose fields carry the meaning (NIR-style): no meaning
hides in free-form dictionaries. Shapes are per sample (the batch dimension is implicit).
Weights are named tensors in `Graph.weights`; ops and states refer to them by name.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Union

import numpy as np

Shape = tuple[int, ...]

FORMAT_VERSION = 1  # of the textual IR and of the bundle; bump on incompatible changes


# --------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activation:
    """A pointwise nonlinearity rho.

    kind: 'identity' | 'relu' (unbounded) | 'clip' (clip(u, lo, hi)) |
          'hardsigmoid' (clip(alpha*u + beta, 0, 1)).
    """

    kind: str = "identity"
    lo: float = 0.0
    hi: float = 1.0
    alpha: float = 0.2
    beta: float = 0.5

    KINDS: ClassVar[tuple[str, ...]] = ("identity", "relu", "clip", "hardsigmoid")

    @staticmethod
    def identity() -> "Activation":
        return Activation("identity")

    @staticmethod
    def relu() -> "Activation":
        return Activation("relu")

    @staticmethod
    def clip(lo: float, hi: float) -> "Activation":
        return Activation("clip", lo=float(lo), hi=float(hi))

    @staticmethod
    def hardsigmoid(alpha: float = 0.2, beta: float = 0.5) -> "Activation":
        return Activation("hardsigmoid", alpha=float(alpha), beta=float(beta))

    @property
    def bounded(self) -> bool:
        return self.kind in ("clip", "hardsigmoid")

    @property
    def probability(self) -> bool:
        """Whether rho(u) always lies in [0, 1], so it can be a firing probability (what a
        bernoulli neuron needs): a hard sigmoid, or clip(lo, hi) with 0 <= lo < hi <= 1."""
        if self.kind == "hardsigmoid":
            return True
        return self.kind == "clip" and 0.0 <= self.lo < self.hi <= 1.0

    def fields(self) -> dict:
        """The fields that matter for this kind (what the printer writes)."""
        if self.kind == "clip":
            return {"lo": self.lo, "hi": self.hi}
        if self.kind == "hardsigmoid":
            return {"alpha": self.alpha, "beta": self.beta}
        return {}


# --------------------------------------------------------------------------- operations
# Linear ops may appear in feedforward nodes and in coupling chains. What each op means
# (shape rule, forward, adjoint, MACs, its neuromorphic instruction) is its entry in the op
# registry, compiler/ops.py; a new op is a dataclass here (listed in OP_TYPES) and a rule
# there.
@dataclass
class Dense:
    """y = W x for a 1-D per-sample input; weight shape [out, in]."""

    weight: str
    kind: ClassVar[str] = "dense"
    linear: ClassVar[bool] = True


@dataclass
class Conv:
    """2-D convolution; weight [C_out, C_in/groups, kH, kW]; pads [h_begin, w_begin, h_end, w_end]."""

    weight: str
    stride: list[int] = field(default_factory=lambda: [1, 1])
    pads: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    dilation: list[int] = field(default_factory=lambda: [1, 1])
    groups: int = 1
    kind: ClassVar[str] = "conv"
    linear: ClassVar[bool] = True


@dataclass
class MaxPool:
    """Max pooling; piecewise linear (its adjoint routes to the argmax)."""

    kernel: list[int]
    stride: list[int]
    pads: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    dilation: list[int] = field(default_factory=lambda: [1, 1])
    ceil_mode: bool = False
    kind: ClassVar[str] = "maxpool"
    linear: ClassVar[bool] = True


@dataclass
class AvgPool:
    kernel: list[int]
    stride: list[int]
    pads: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    count_include_pad: bool = False
    ceil_mode: bool = False
    kind: ClassVar[str] = "avgpool"
    linear: ClassVar[bool] = True


@dataclass
class GlobalAvgPool:
    """Mean over the spatial axes: [C, H, W] -> [C, 1, 1] (keepdims) or [C]."""

    keepdims: bool = True
    kind: ClassVar[str] = "gavgpool"
    linear: ClassVar[bool] = True


@dataclass
class Flatten:
    """[d0, d1, ...] -> [d0*d1*...] per sample."""

    kind: ClassVar[str] = "flatten"
    linear: ClassVar[bool] = True


@dataclass
class Identity:
    kind: ClassVar[str] = "identity"
    linear: ClassVar[bool] = True


@dataclass
class ChannelScale:
    """Multiply channel c (axis 0 of the per-sample shape) by weight[c]."""

    weight: str
    kind: ClassVar[str] = "chanscale"
    linear: ClassVar[bool] = True


@dataclass
class Pad:
    """Zero padding and cropping: pads [b_0, ..., b_{r-1}, e_0, ..., e_{r-1}] (ONNX order)
    add b_i zeros before and e_i after axis i of the per-sample value; a negative entry
    crops that many elements instead. What a channel Concat places each part with (a pad
    on axis 0), what a Split or Slice takes (a crop), and a spatial Pad."""

    pads: list[int]
    kind: ClassVar[str] = "pad"
    linear: ClassVar[bool] = True


@dataclass
class Permute:
    """A per-sample permutation of the elements: reshape to `dims`, transpose the axes to
    the order `perm`, reshape to `shape` (a channel shuffle, a Reshape/Transpose pair)."""

    dims: list[int]
    perm: list[int]
    shape: list[int]
    kind: ClassVar[str] = "permute"
    linear: ClassVar[bool] = True


@dataclass
class AdaptiveAvgPool:
    """Adaptive average pooling of [C, H, W] to [C, *out]: output (i, j) is the mean of
    rows floor(i*H/oh) .. ceil((i+1)*H/oh) - 1 and the same for columns (PyTorch's
    windows). Used where the windows differ in size; equal windows are an AvgPool."""

    out: list[int]
    kind: ClassVar[str] = "adaptiveavgpool"
    linear: ClassVar[bool] = True


# Feedforward-only ops: canonicalize / to_energy remove or absorb all of them.
@dataclass
class Bias:
    """y = x + b, b broadcast to the value's shape (e.g. [C, 1, 1] for conv outputs)."""

    weight: str
    kind: ClassVar[str] = "bias"
    linear: ClassVar[bool] = False


@dataclass
class BatchNorm:
    """Inference batch norm over channel axis 0: (x - mean) / sqrt(var + eps) * scale + shift."""

    scale: str
    shift: str
    mean: str
    var: str
    epsilon: float = 1e-5
    kind: ClassVar[str] = "batchnorm"
    linear: ClassVar[bool] = False


@dataclass
class Act:
    """A pointwise nonlinearity; to_energy turns each into a state."""

    fn: Activation
    kind: ClassVar[str] = "act"
    linear: ClassVar[bool] = False


@dataclass
class Add:
    """Elementwise sum of all inputs (ONNX Add / Sum): residual joins."""

    kind: ClassVar[str] = "add"
    linear: ClassVar[bool] = False


@dataclass
class Concat:
    """Concatenation of all inputs along per-sample axis `axis` (0: the channels). to_energy
    places each input's terms with a Pad, so a concatenated value is a sum of couplings."""

    axis: int = 0
    kind: ClassVar[str] = "concat"
    linear: ClassVar[bool] = False


@dataclass
class Dropout:
    """Inference dropout: the identity. Dropped by canonicalize."""

    kind: ClassVar[str] = "dropout"
    linear: ClassVar[bool] = False


@dataclass
class Softmax:
    """Softmax / LogSoftmax over the class axis; only allowed at an output, dropped there."""

    log: bool = False
    kind: ClassVar[str] = "softmax"
    linear: ClassVar[bool] = False


LinearOp = Union[Dense, Conv, MaxPool, AvgPool, GlobalAvgPool, Flatten, Identity, ChannelScale,
                 Pad, Permute, AdaptiveAvgPool]
Op = Union[LinearOp, Bias, BatchNorm, Act, Add, Concat, Dropout, Softmax]

OP_TYPES: dict[str, type] = {
    t.kind: t
    for t in (Dense, Conv, MaxPool, AvgPool, GlobalAvgPool, Flatten, Identity, ChannelScale,
              Pad, Permute, AdaptiveAvgPool, Bias, BatchNorm, Act, Add, Concat, Dropout,
              Softmax)
}
LINEAR_KINDS = frozenset(k for k, t in OP_TYPES.items() if t.linear)


def op_weights(op) -> dict[str, str]:
    """Field name -> weight name for every weight an op refers to."""
    names = ("weight", "scale", "shift", "mean", "var")
    return {f.name: getattr(op, f.name) for f in dataclasses.fields(op) if f.name in names}


# --------------------------------------------------------------------------- graph entities
@dataclass
class Input:
    """A clamped input population."""

    name: str
    shape: Shape


@dataclass
class Node:
    """One feedforward operation: `name = op(inputs...)` with output `shape`."""

    name: str
    op: Op
    inputs: list[str]
    shape: Shape


STATE_ROLES = ("hidden", "output", "tap", "teacher")
NEURON_MODELS = ("rate", "bernoulli")


@dataclass
class State:
    """A neuron population.

    act:         the activation rho used when settling (e.g. clip(0, 1) for a ReLU).
    source_act:  the nonlinearity of the source model at this point (what `--verify`
                 uses with bounds lifted).
    neuron:      'rate' (deterministic) or 'bernoulli' (StochEP spiking; in the mean-field
                 limit the same dynamics).
    role:        'hidden' | 'output' (label readout) | 'tap' (auxiliary error readout) |
                 'teacher' (frozen, computed feedforward, never settled).
    bias:        weight name of b_j (broadcastable to shape), or None.
    readout:     outside the energy (an output or tap head, `epc compile --readout`): the
                 state is its inbound couplings' value plus bias, with no term in Phi and no
                 feedback to its sources; its costs nudge the sources through the
                 couplings' adjoints (the linear readout of Laborieux et al. 2021).
    """

    name: str
    shape: Shape
    act: Activation
    source_act: Activation
    neuron: str = "rate"
    role: str = "hidden"
    bias: str | None = None
    readout: bool = False


COUPLING_KINDS = ("forward", "residual", "tap", "teacher")


@dataclass
class Coupling:
    """A bilinear term <s_dst, L(s_src)> of Phi, L = ops[-1] o ... o ops[0].

    kind:     'forward' | 'residual' (skip link) | 'tap' (error-tap head) | 'teacher'
              (frozen teacher chain, feedforward only).
    feedback: whether the tied transpose L^T drives `src` (symmetric feedback).
    feedback_gain: the feedback drives `src` as gain * L^T(s_dst) (feedback regulation;
              1 = the energy's own symmetric feedback). With gains below 1 the settling
              is the gradient flow of an energy in rescaled states, and the EP estimate
              is corrected for them (runtime/learn.py).
    """

    name: str
    src: str
    dst: str
    ops: list
    kind: str = "forward"
    feedback: bool = False
    feedback_gain: float = 1.0


COST_KINDS = ("mse", "ce", "kl")


@dataclass
class Cost:
    """A term of the nudging cost on a state.

    kind:   'mse' (against one-hot or a teacher state), 'ce' (softmax cross-entropy),
            'kl' (distillation: KL(softmax(teacher/T) || softmax(state/T)) * T^2).
    target: 'label' or the name of a teacher state.
    """

    name: str
    state: str
    kind: str = "mse"
    target: str = "label"
    weight: float = 1.0
    temperature: float = 1.0


@dataclass
class Teacher:
    """A frozen teacher network (its states have role 'teacher')."""

    name: str
    source: str            # 'source' (the compiled model itself) or the file it came from
    output: str            # the teacher state holding its logits
    temperature: float = 4.0
    mix: float = 0.5       # share of the teacher cost in the output cost


AVERAGINGS = ("trace", "window")
SAMPLINGS = ("shared", "independent")


@dataclass
class Spiking:
    """How the graph's Bernoulli (StochEP) states run: the schedule's part for them.

    Each time step is one sweep of the colour classes. A bernoulli state j draws spikes
    z_j in {0, 1} with probability rho_j(u_j) and keeps a running estimate r_j of its
    firing rate; r_j is what its neighbours (and the EP update) see:

      averaging 'trace':  r <- r + (z - r) / tau      (exponential trace, decay 1/tau)
      averaging 'window': r =  mean of the last tau spikes (zero before the phase's first)

    A stochastic phase has no tolerance: its state never stops moving (the estimate's
    change per step is sampling noise of order 1/tau), so each phase runs exactly its
    time steps: `time_steps` free, `nudge_time_steps` each nudged phase (from the free
    phase's end). `sampling`: where the nudged phases' random numbers come from:
    'shared', both continue the free phase's stream (the same numbers, so +beta and
    -beta differ by the nudge alone); 'independent', each phase draws its own. The
    compiler picks the time steps and averaging by the graph's depth when no flag sets
    them (passes/schedule.py spiking_defaults); these field defaults are the one-hidden-
    state values.
    """

    time_steps: int = 64
    nudge_time_steps: int = 32
    averaging: str = "trace"
    tau: int = 8
    sampling: str = "shared"


@dataclass
class Schedule:
    """How to settle: colour classes in update order (or sync), sweep caps, tolerance;
    for a graph with bernoulli states, `spiking` (time steps, averaging, sampling)."""

    mode: str = "colour"                    # 'colour' | 'sync'
    classes: list[list[str]] = field(default_factory=list)
    max_sweeps: int = 100                   # free phase cap
    nudge_sweeps: int = 40                  # each nudged phase cap
    tol: float = 1e-4                       # max |delta s| below which a phase has settled
    spiking: Spiking | None = None          # set exactly when a state is bernoulli


@dataclass
class WeightSpec:
    """A declared weight whose data is not loaded (a text-only IR)."""

    shape: Shape
    dtype: str = "f32"


@dataclass(frozen=True)
class Seeded:
    """Weight data drawn from a seed: the text IR's `= seeded(7)` / `= seeded(7, lo=0.5, hi=1.5)`.

    Uniform in [lo, hi) when both are given, else in +-1/sqrt(fan_in) with fan_in the
    product of the dimensions after the first (1 for a vector): torch's default bound for
    Linear and Conv weights. Drawn in float64 by numpy's legacy RandomState(seed), whose
    stream numpy keeps fixed across versions, then cast to the weight's dtype. Why: a pass
    test written as text needs real, reproducible weights without pages of numbers.
    """

    seed: int
    lo: float | None = None
    hi: float | None = None

    def make(self, shape: Shape, dtype=np.float32) -> np.ndarray:
        shape = tuple(int(d) for d in shape)
        if self.lo is None:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            lo, hi = -1.0 / np.sqrt(max(fan_in, 1)), 1.0 / np.sqrt(max(fan_in, 1))
        else:
            lo, hi = float(self.lo), float(self.hi)
        data = np.random.RandomState(self.seed).uniform(lo, hi, size=shape)
        return np.array(data.astype(dtype), order="C")   # (ascontiguousarray makes 0-d 1-d)


@dataclass
class Graph:
    name: str
    inputs: list[Input] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    states: list[State] = field(default_factory=list)
    couplings: list[Coupling] = field(default_factory=list)
    costs: list[Cost] = field(default_factory=list)
    teacher: Teacher | None = None
    schedule: Schedule | None = None
    attrs: dict[str, str] = field(default_factory=dict)   # provenance (source file, frontend)
    weights: dict[str, Union[np.ndarray, WeightSpec]] = field(default_factory=dict)
    # weights the text IR gave as `seeded(...)`: printed as that recipe again while the data
    # is still what the recipe makes (a pass that rewrites a weight loses its recipe)
    seeds: dict[str, Seeded] = field(default_factory=dict)

    # ---- form
    @property
    def is_energy(self) -> bool:
        return bool(self.states) and not self.nodes

    # ---- lookups
    def state(self, name: str) -> State:
        for s in self.states:
            if s.name == name:
                return s
        raise KeyError(name)

    def input(self, name: str) -> Input:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(name)

    def coupling(self, name: str) -> Coupling:
        for c in self.couplings:
            if c.name == name:
                return c
        raise KeyError(name)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def uses(self, value: str) -> int:
        """How many places read node value `value` (a node reading it twice counts twice;
        graph outputs count)."""
        return sum(n.inputs.count(value) for n in self.nodes) + self.outputs.count(value)

    def rewire(self, old: str, new: str) -> None:
        """Every read of node value `old` (node inputs, graph outputs) now reads `new`."""
        for n in self.nodes:
            n.inputs = [new if x == old else x for x in n.inputs]
        self.outputs = [new if o == old else o for o in self.outputs]

    def shape_of(self, name: str) -> Shape:
        """Shape of an input, state or node value."""
        for coll in (self.inputs, self.states, self.nodes):
            for x in coll:
                if x.name == name:
                    return tuple(x.shape)
        raise KeyError(name)

    def inbound(self, state: str) -> list[Coupling]:
        return [c for c in self.couplings if c.dst == state]

    def outbound(self, name: str) -> list[Coupling]:
        return [c for c in self.couplings if c.src == name]

    def consumers(self, value: str) -> list[Node]:
        return [n for n in self.nodes if value in n.inputs]

    @property
    def stochastic(self) -> bool:
        """Whether a state is a Bernoulli (spiking) population."""
        return any(s.neuron == "bernoulli" for s in self.states)

    def settled_states(self) -> list[State]:
        """States that settling updates (teacher states are computed feedforward)."""
        return [s for s in self.states if s.role != "teacher"]

    def output_state(self) -> State:
        outs = [s for s in self.states if s.role == "output"]
        if len(outs) != 1:
            raise KeyError(f"graph {self.name} has {len(outs)} output states, expected 1")
        return outs[0]

    def weight_names(self) -> Iterator[str]:
        """Every weight name referenced by ops, nodes and state biases, in order."""
        seen = set()
        ops = [n.op for n in self.nodes] + [op for c in self.couplings for op in c.ops]
        refs = [w for op in ops for w in op_weights(op).values()]
        refs += [s.bias for s in self.states if s.bias]
        for w in refs:
            if w not in seen:
                seen.add(w)
                yield w

    def fresh_name(self, base: str) -> str:
        """A name not used by any entity or weight (for passes that create things)."""
        taken = {x.name for coll in (self.inputs, self.nodes, self.states, self.couplings,
                                     self.costs) for x in coll}
        taken |= set(self.weights)
        if self.teacher:
            taken.add(self.teacher.name)
        if base not in taken:
            return base
        i = 1
        while f"{base}_{i}" in taken:
            i += 1
        return f"{base}_{i}"

    def copy(self) -> "Graph":
        """Deep copy of the structure; weight arrays are copied too (passes may rewrite them)."""
        g = copy.deepcopy(dataclasses.replace(self, weights={}))
        g.weights = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.weights.items()}
        return g

    def num_parameters(self, learnable_only: bool = True) -> int:
        total = 0
        frozen = {w for c in self.couplings if c.kind == "teacher" for op in c.ops
                  for w in op_weights(op).values()}
        frozen |= {s.bias for s in self.states if s.role == "teacher" and s.bias}
        for name in self.weight_names():
            if learnable_only and name in frozen:
                continue
            total += int(np.prod(self.weights[name].shape))
        return total
