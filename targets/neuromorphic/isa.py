"""The instruction set of one neuromorphic core: what a program is made of.

A program is a list of declarations (memories, neuron groups, synapse chains, costs) and
a sequence of phases (teacher pass, free settling, the two nudged phases, the learning
step). docs/isa.md documents the arithmetic; this module holds the data model
shared by the quantizer, assembler, binary codec, validator and simulator.

Numbers: every value in a memory is an integer. States are fixed point with F fractional
bits (1.0 = 2^F); a weight mantissa M with exponent e stands for M * 2^e; a bias is stored
at state scale (b * 2^F). The simulator keeps integers in float64 tensors (exact below
2^53), which is far faster than integer dtypes on CPUs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ISA_VERSION = 3            # newest program format read (assembly and binary); bump on changes
# version 2 adds the max-pool winner rules (`.config pool_freeze=N`, `.phase ... pool=free`);
# version 3 the spike generator (`.config spike_seed=S`, `.group ... neuron=bernoulli
# tau_shift=K`, `.phase ... mean=H noise=free|own`); a program is written in the oldest
# version that expresses it, so one that uses none of these is byte for byte as before
MAGIC = b"EPCNC\x00"       # first bytes of a binary program
ASM_HEADER = ".epc-nc"     # first token of an assembly program

ACC_BITS = 32              # accumulator width of a synapse chain (checked worst case)
MEM_KINDS = ("input", "state", "weight", "exp", "bias")
GROUP_ROLES = ("hidden", "output", "tap", "teacher")
GROUP_ACTS = ("clip", "relu", "identity")
NEURONS = ("rate", "bernoulli")
NOISES = ("free", "own")   # a stochastic nudged phase's spike words: the free phase's
                           # generators continued (both nudged phases the same), or its own
TAU_SHIFT_RANGE = (0, 12)  # a bernoulli group's rate trace decays by 2^-tau_shift per step
SYN_KINDS = ("forward", "residual", "tap", "teacher")
PHASES = ("teacher", "free", "nudge+", "nudge-")
MAX_SWEEP_CAP = 100000
WEIGHT_BITS_RANGE = (2, 16)
STATE_BITS_RANGE = (2, 24)
EXP_RANGE = (-31, 31)
BETA_FRAC = 12            # fractional bits of the nudge strength constant
COST_WEIGHT_FRAC = 8      # fractional bits of a cost's weight
SHIFT_RANGE = (-24, 48)   # allowed total right shift of a synapse chain


@dataclass
class Memory:
    """An on-core memory: `bits` wide two's complement (signed) or unsigned words.

    kind: input (clamped input, written by the host), state (a neuron group's values),
          weight (mantissas), exp (weight exponents: [1] per synapse, or [C_out]),
          bias (at state scale).
    data: the contents of a constant memory (weight/exp/bias), int64; None otherwise.
    """

    name: str
    kind: str
    signed: bool
    bits: int
    shape: tuple[int, ...]
    data: np.ndarray | None = None

    @property
    def size(self) -> int:
        return math.prod(int(d) for d in self.shape)     # (np.prod wraps past 2^63)

    @property
    def lo(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def nbytes(self) -> int:
        """Bytes used when packed at `bits` per word."""
        return (self.size * self.bits + 7) // 8

    def type_str(self) -> str:
        return f"{'s' if self.signed else 'u'}{self.bits}"


@dataclass
class Group:
    """A neuron group: its state memory, activation bounds (integers), bias and role.

    The activation is clipping: s = clamp(drive, lo, hi); an identity state has the full
    range of its (signed) memory and saturates there.
    """

    name: str
    mem: str
    lo: int
    hi: int
    role: str = "hidden"
    bias: str | None = None
    act: str = "clip"     # clip: both bounds are the activation; relu: the upper bound is
                          # saturation (counted); identity: both bounds are saturation
    neuron: str = "rate"  # bernoulli: clamp(u, lo, hi) / 2^F is a firing probability; the
                          # group spikes and its state is its firing-rate trace (isa.md)
    tau_shift: int = 0    # bernoulli: the trace decays by 2^-tau_shift per time step


@dataclass
class SynOp:
    """One stage of a synapse chain.

    kind: dense (w, e), conv (w, e, stride, pads, dilation, groups), chscale (w, e),
          maxpool (kernel, stride, pads, dilation, ceil), sumpool (kernel, stride, pads,
          ceil, rmul, rshift), gsum (keepdims, rmul, rshift), apool (out, rmul, rshift),
          pad (edges), permute (dims, perm, out), flatten, identity.
    Each instruction is declared by the op registry rule that lowers to it
    (compiler/ops.py, the rule's `core`: its name, its fields in assembly order, its
    integer arithmetic); the assembler, validator and simulator read it there.
    A sumpool/gsum sums its window exactly; the division by the window area is the
    multiply by `rmul` and `rshift` more bits of the chain's final rounding shift (for a
    power-of-two area rmul = 1 and the division is exact).
    """

    kind: str
    w: str | None = None
    e: str | None = None
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    ceil: bool = False
    keepdims: bool = True
    rmul: int = 1
    rshift: int = 0
    edges: tuple[int, ...] = ()      # pad: [b_0.., e_0..] per axis, negative = crop
    dims: tuple[int, ...] = ()       # permute: reshape, transpose, reshape
    perm: tuple[int, ...] = ()
    out: tuple[int, ...] = ()        # permute: output shape; apool: output plane


@dataclass
class Synapse:
    """A coupling: drive into `dst` is the chain applied to `src`; with feedback, the
    chain's transpose (at the current src) drives `src` too. learn: the learning step
    updates its weight memories."""

    name: str
    src: str
    dst: str
    ops: list[SynOp]
    kind: str = "forward"
    feedback: bool = False
    learn: bool = True


@dataclass
class CostSpec:
    """An mse nudge on `group`: drive -= round_shift(sign * beta_q * wq * (s - y),
    BETA_FRAC + COST_WEIGHT_FRAC); y is the one-hot label (1.0 = 2^F) or a teacher group."""

    name: str
    group: str
    target: str = "label"
    wq: int = 1 << COST_WEIGHT_FRAC


@dataclass
class Phase:
    """A settling phase: `classes` are updated in order (a class's groups as one block
    from the same snapshot) each sweep, until no state changes or `sweeps` sweeps."""

    name: str
    sweeps: int
    classes: list[list[str]] = field(default_factory=list)
    hold_pool: bool = False   # `pool=free`: max-pools keep the free phase's winners (nudged
                              # phases only; the learning step then uses them too)
    # programs with bernoulli groups: the phase runs exactly `sweeps` time steps and its
    # result is each group's mean over the last `mean` of them (0: a rate program);
    # `noise` (their nudged phases): their spike generators continue the free phase's
    # ('free') or are seeded on their own ('own'); '' elsewhere
    mean: int = 0
    noise: str = ""


@dataclass
class Program:
    name: str
    frac_bits: int = 8
    beta_q: int = 0                     # nudge strength * 2^BETA_FRAC
    lr_shift: int = 10                  # learning rate 2^-lr_shift (see docs/isa.md)
    seed: int = 0                       # PRNG seed for stochastic rounding
    rng_step: int = 0                   # PRNG counter (learning steps taken)
    pool_freeze: int = 0                # freeze max-pool winners after this many sweeps of
                                        # a settling phase (0: never)
    spike_seed: int = 0                 # seeds the bernoulli groups' xorshift32 spike
                                        # generators (nonzero; 0 in rate programs)
    inputs: list[str] = field(default_factory=list)     # input memories
    memories: list[Memory] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    synapses: list[Synapse] = field(default_factory=list)
    costs: list[CostSpec] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    learn: list[str] = field(default_factory=list)      # synapses and group biases learned
    meta: dict = field(default_factory=dict)            # provenance: str -> str

    def mem(self, name: str) -> Memory:
        for m in self.memories:
            if m.name == name:
                return m
        raise KeyError(name)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def phase(self, name: str) -> Phase | None:
        for p in self.phases:
            if p.name == name:
                return p
        return None

    def output_group(self) -> Group:
        return next(g for g in self.groups if g.role == "output")

    @property
    def stochastic(self) -> bool:
        """Whether a group is bernoulli (its phases then run exactly their time steps)."""
        return any(g.neuron == "bernoulli" for g in self.groups)

    @property
    def beta(self) -> float:
        return self.beta_q / (1 << BETA_FRAC)


def format_version(prog: Program) -> int:
    """The oldest format version that expresses `prog` (what the writers put in headers)."""
    if prog.stochastic or prog.spike_seed or any(ph.mean for ph in prog.phases):
        return 3
    if prog.pool_freeze or any(ph.hold_pool for ph in prog.phases):
        return 2
    return 1


def mix32(x: int) -> int:
    """The core's 32-bit mixer H (docs/isa.md; runtime/simulator.py hash32 is its
    vectorised twin): x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B;
    x ^= x >> 16."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def reads_spikes(prog: Program, syn: Synapse, feedback: bool = False) -> bool:
    """Whether a synapse reads spikes in one direction (forward: from its source group;
    feedback: from its destination group): that group is bernoulli and the chain has no
    max-pool (a max-pool of spikes is an OR, not the max of the rates, so such a chain
    reads the group's rate trace with multiply-accumulates, as from a rate group)."""
    from epc.compiler import ops as O
    name = syn.dst if feedback else syn.src
    grp = next((g for g in prog.groups if g.name == name), None)
    if grp is None or grp.neuron != "bernoulli":
        return False
    return not any(getattr(O.core_rule(op.kind), "piecewise", False) for op in syn.ops)


def bits_for_signed(lo: int, hi: int) -> int:
    """Smallest two's complement width holding [lo, hi]."""
    b = 1
    while -(1 << (b - 1)) > lo or (1 << (b - 1)) - 1 < hi:
        b += 1
    return b


def bits_for_unsigned(hi: int) -> int:
    return max(1, int(hi).bit_length())
