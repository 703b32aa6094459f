"""The program validator: what a core would check before loading a program.

`validate(prog, source)` raises one EpcError naming the first bad instruction (e.g.
`r13.nc: .syn c4: ...`): bit widths in range, words within their width, every reference
resolved to a memory/group of the right kind, synapse chains that map their source shape
onto their destination, exponents and shifts in range, a worst-case accumulator that fits
32 bits (so the simulator's exact arithmetic is also the hardware's), sweep caps, and a
sequence that updates every settled group exactly once per sweep of each phase.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from epc.compiler import ops as O
from epc.compiler.errors import EpcError

from .isa import (ACC_BITS, BETA_FRAC, EXP_RANGE, GROUP_ACTS, GROUP_ROLES, MAX_SWEEP_CAP,
                  MEM_KINDS, NEURONS, NOISES, PHASES, SHIFT_RANGE, STATE_BITS_RANGE, SYN_KINDS,
                  TAU_SHIFT_RANGE, WEIGHT_BITS_RANGE, Program, reads_spikes)

class AccumulatorOverflow(EpcError):
    """A synapse whose worst-case accumulator does not fit 32 bits; `excess` is by how
    many bits (what compile_program's suggestion of narrower settings starts from)."""

    def __init__(self, message: str, excess: float):
        super().__init__(message)
        self.excess = excess


_BITS = {"weight": WEIGHT_BITS_RANGE, "state": STATE_BITS_RANGE, "input": STATE_BITS_RANGE,
         "exp": (2, 8), "bias": (2, 32)}


def _broadcasts(bshape, shape) -> bool:
    if len(bshape) > len(shape):
        return False
    return all(b in (1, s) for b, s in zip(tuple(bshape)[::-1], tuple(shape)[::-1]))


def validate(prog: Program, source: str = "program") -> Program:
    """`prog` if it is a valid program; else one EpcError naming the first bad
    instruction. The checks run in the order the program declares things."""
    v = _Validator(prog, source)
    v.config()
    v.memories()
    v.neuron_groups()
    v.spike_seed()
    for s in prog.synapses:
        v.synapse(s)
    if not any(s.dst == g.name for s in prog.synapses for g in prog.groups) and prog.groups:
        v.fail(".syn", "no synapse drives any group")
    v.costs()
    v.phases()
    v.learn()
    return prog


class _Validator:
    """The checks of `validate`, one method per part of a program."""

    def __init__(self, prog: Program, source: str):
        self.prog, self.source = prog, source
        self.mems: dict = {}
        self.groups: dict = {}
        self.syns: dict = {}

    def fail(self, where: str, msg: str):
        raise EpcError(f"{self.source}: {where}: {msg}")

    def config(self) -> None:
        prog, fail = self.prog, self.fail
        if not 1 <= prog.frac_bits <= 16:
            fail(".config", f"frac_bits={prog.frac_bits} out of range 1..16")
        if not 0 <= prog.beta_q < (1 << (BETA_FRAC + 8)):
            fail(".config", f"beta_q={prog.beta_q} out of range 0..{(1 << (BETA_FRAC + 8)) - 1}")
        if not 0 <= prog.lr_shift <= 48:
            fail(".config", f"lr_shift={prog.lr_shift} out of range 0..48")
        if not 0 <= prog.seed <= 0xFFFFFFFF or prog.rng_step < 0:
            fail(".config", "seed must be a 32-bit unsigned value and rng_step >= 0")
        if not 0 <= prog.pool_freeze <= MAX_SWEEP_CAP:
            fail(".config", f"pool_freeze={prog.pool_freeze} out of range 0..{MAX_SWEEP_CAP}")
        if not 0 <= prog.spike_seed <= 0xFFFFFFFF:
            fail(".config", f"spike_seed={prog.spike_seed} is not a 32-bit unsigned word")

    # ---- memories and inputs
    def memories(self) -> None:
        for m in self.prog.memories:
            self.memory(m)
        if not self.prog.inputs:
            self.fail(".input", "program has no input memory")
        for n in self.prog.inputs:
            if n not in self.mems or self.mems[n].kind != "input":
                self.fail(f".input {n}", "not an input memory")

    def memory(self, m) -> None:
        fail, w = self.fail, f".mem {m.name}"
        if m.name in self.mems:
            fail(w, "declared twice")
        self.mems[m.name] = m
        if m.kind not in MEM_KINDS:
            fail(w, f"kind {m.kind!r} (supported: {', '.join(MEM_KINDS)})")
        lo, hi = _BITS[m.kind]
        if not lo <= m.bits <= hi:
            fail(w, f"width {m.type_str()} out of range for a {m.kind} memory "
                    f"({lo}..{hi} bits)")
        if m.kind in ("weight", "exp", "bias") and not m.signed:
            fail(w, f"a {m.kind} memory must be signed")
        if not m.shape or any(d <= 0 for d in m.shape) or m.size > (1 << 28):
            fail(w, f"bad shape {list(m.shape)}")
        const = m.kind in ("weight", "exp", "bias")
        if const and m.data is None:
            fail(w, "constant memory without .data")
        if not const and m.data is not None:
            fail(w, f"a {m.kind} memory has no initial data")
        if const:
            d = np.asarray(m.data)
            if d.shape != tuple(m.shape):
                fail(w, f"data shape {list(d.shape)} != {list(m.shape)}")
            if d.size and (int(d.min()) < m.lo or int(d.max()) > m.hi):
                bad = int(d.min()) if int(d.min()) < m.lo else int(d.max())
                fail(w, f"word {bad} does not fit {m.type_str()} ({m.lo}..{m.hi})")
            if m.kind == "exp" and d.size and (d.min() < EXP_RANGE[0] or d.max() > EXP_RANGE[1]):
                fail(w, f"exponent out of range {EXP_RANGE[0]}..{EXP_RANGE[1]}")

    # ---- neuron groups
    def neuron_groups(self) -> None:
        prog, fail, mems = self.prog, self.fail, self.mems
        for g in prog.groups:
            w = f".group {g.name}"
            if g.name in self.groups:
                fail(w, "declared twice")
            self.groups[g.name] = g
            if g.mem not in mems or mems[g.mem].kind != "state":
                fail(w, f"mem={g.mem} is not a state memory")
            m = mems[g.mem]
            if g.role not in GROUP_ROLES:
                fail(w, f"role {g.role!r} (supported: {', '.join(GROUP_ROLES)})")
            if g.act not in GROUP_ACTS:
                fail(w, f"act {g.act!r} (supported: {', '.join(GROUP_ACTS)})")
            if not (m.lo <= g.lo <= g.hi <= m.hi):
                fail(w, f"bounds lo={g.lo} hi={g.hi} do not fit its memory {m.type_str()} "
                        f"({m.lo}..{m.hi})")
            if g.neuron not in NEURONS:
                fail(w, f"neuron {g.neuron!r} (supported: {', '.join(NEURONS)})")
            if g.neuron == "bernoulli":
                self.spiking_group(g, m, w)
            elif g.tau_shift:
                fail(w, "tau_shift= is for bernoulli groups")
            if g.bias is not None:
                if g.bias not in mems or mems[g.bias].kind != "bias":
                    fail(w, f"bias={g.bias} is not a bias memory")
                if not _broadcasts(mems[g.bias].shape, m.shape):
                    fail(w, f"bias {g.bias} {list(mems[g.bias].shape)} does not broadcast to "
                            f"{list(m.shape)}")
        if sum(g.role == "output" for g in prog.groups) != 1:
            fail(".group", "a program needs exactly one group with role=output")
        if len({g.mem for g in prog.groups}) != len(prog.groups):
            fail(".group", "two groups share a state memory")

    def spike_seed(self) -> None:
        """The spike generators are xorshift32 registers: a zero state never leaves zero."""
        prog, fail = self.prog, self.fail
        if prog.stochastic and prog.spike_seed == 0:
            fail(".config", "spike_seed=0: a program with bernoulli groups needs a nonzero "
                            "seed for its xorshift32 spike generators (zero is their stuck "
                            "state)")
        if not prog.stochastic and prog.spike_seed:
            fail(".config", "spike_seed= without a bernoulli group")

    def spiking_group(self, g, m, w: str) -> None:
        """A bernoulli group: clamp(u, lo, hi) is its firing probability at scale 2^F, so
        the activation must be a clip within [0, 2^F] (an unbounded or signed activation
        is no probability), and its trace's decay shift must be in range."""
        fail, F = self.fail, self.prog.frac_bits
        if g.act != "clip":
            fail(w, f"a bernoulli group needs a bounded activation (act=clip), not act={g.act}: "
                    f"clamp(u, lo, hi) / 2^F is its firing probability")
        if m.signed or not 0 <= g.lo < g.hi <= (1 << F):
            fail(w, f"bernoulli group: firing probability bounds lo={g.lo} hi={g.hi} on "
                    f"{m.type_str()} are not within the probability scale 0..2^F = {1 << F}")
        if g.role == "teacher":
            fail(w, "a teacher group is a feedforward pass, not a bernoulli group")
        if not TAU_SHIFT_RANGE[0] <= g.tau_shift <= TAU_SHIFT_RANGE[1]:
            fail(w, f"tau_shift={g.tau_shift} out of range {TAU_SHIFT_RANGE[0]}.."
                    f"{TAU_SHIFT_RANGE[1]}")

    def shape_of(self, name: str) -> tuple:
        if name in self.groups:
            return tuple(self.mems[self.groups[name].mem].shape)
        return tuple(self.mems[name].shape)

    def maxabs(self, name: str) -> int:
        if name in self.groups:
            return max(abs(self.groups[name].lo), abs(self.groups[name].hi))
        m = self.mems[name]
        return max(abs(m.lo), abs(m.hi))

    # ---- synapses
    def synapse(self, s) -> None:
        fail, groups, mems, w = self.fail, self.groups, self.mems, f".syn {s.name}"
        if s.name in self.syns or s.name in groups:
            fail(w, "name already used")
        self.syns[s.name] = s
        if s.kind not in SYN_KINDS:
            fail(w, f"kind {s.kind!r} (supported: {', '.join(SYN_KINDS)})")
        if s.src not in groups and not (s.src in mems and mems[s.src].kind == "input"):
            fail(w, f"source {s.src} is neither a group nor an input memory")
        if s.dst not in groups:
            fail(w, f"destination {s.dst} is not a group")
        if s.feedback and s.src not in groups:
            fail(w, "feedback into a clamped input")
        teacher_dst = groups[s.dst].role == "teacher"
        if (s.kind == "teacher") != teacher_dst:
            fail(w, "teacher synapses drive teacher groups, and only they do")
        if s.kind == "teacher" and (s.feedback or s.learn):
            fail(w, "a teacher synapse is frozen (fb=0 learn=0)")
        if not s.ops:
            fail(w, "empty chain (use identity)")
        W, total_shift, mult = self.instructions(s, w)
        self.accumulator(s, w, W, total_shift, mult)

    def instructions(self, s, w: str) -> tuple[dict, int, int]:
        """Each instruction's references and fields; returns the chain's |mantissas|
        (aligned to each weight's smallest exponent), total right shift and multiplier."""
        fail, mems = self.fail, self.mems
        W = {}
        total_shift, mult = 0, 1
        for op in s.ops:
            r = O.core_rule(op.kind)
            if r is None:
                fail(w, f"unknown op {op.kind}")
            if r.core.weighted:
                if op.w not in mems or mems[op.w].kind != "weight":
                    fail(w, f"{op.kind}: w={op.w} is not a weight memory")
                if op.e not in mems or mems[op.e].kind != "exp":
                    fail(w, f"{op.kind}: e={op.e} is not an exponent memory")
                wm, em = mems[op.w], mems[op.e]
                if em.size not in (1, wm.shape[0]):
                    fail(w, f"{op.kind}: exponent memory {op.e} has {em.size} entries; "
                            f"expected 1 or {wm.shape[0]} (one per output channel)")
                e = np.asarray(em.data, dtype=np.int64).reshape(-1)
                emin = int(e.min())
                if int(e.max()) - emin > 16:
                    fail(w, f"{op.kind}: per-channel exponents of {op.e} span "
                            f"{int(e.max()) - emin} > 16 bits")
                M = np.abs(np.asarray(wm.data, dtype=np.float64))
                if e.size > 1:
                    M = M * (2.0 ** (e - emin)).reshape((-1,) + (1,) * (M.ndim - 1))
                W[op.w] = torch.as_tensor(M)
                total_shift -= emin
            if r.core.has("stride"):
                if any(v <= 0 for v in op.stride) or any(v < 0 for v in op.pads) \
                        or any(v <= 0 for v in op.kernel) or any(v <= 0 for v in op.dilation) \
                        or op.groups <= 0:
                    fail(w, f"{op.kind}: bad geometry")
            if r.core.has("rmul"):
                if not 1 <= op.rmul <= (1 << 16) or not 0 <= op.rshift <= 32:
                    fail(w, f"{op.kind}: rmul={op.rmul} rshift={op.rshift} out of range")
            total_shift += op.rshift
            mult *= op.rmul
        return W, total_shift, mult

    def accumulator(self, s, w: str, W: dict, total_shift: int, mult: int) -> None:
        """Shapes and the worst case of the 32-bit accumulator, forward and feedback: the
        chain over |M| applied to the largest source value bounds every sum it forms."""
        fail, shape_of = self.fail, self.shape_of
        try:
            x = torch.full((1, *shape_of(s.src)), float(self.maxabs(s.src)), dtype=torch.float64)
            steps = [O.core_op(op) for op in s.ops]
            ctxs = []
            for r, ir in steps:
                x, ctx = r.core_forward(ir, x, W)
                ctxs.append(ctx)
        except Exception as ex:   # noqa: BLE001 - any shape failure is a bad program
            fail(w, f"chain does not apply to {s.src} {list(shape_of(s.src))}: "
                    f"{str(ex).splitlines()[0] if str(ex) else type(ex).__name__}")
        if tuple(x.shape[1:]) != shape_of(s.dst):
            fail(w, f"chain maps {s.src} {list(shape_of(s.src))} to {list(x.shape[1:])}, but "
                    f"{s.dst} is {list(shape_of(s.dst))}")
        worst = float(x.max()) * mult if x.numel() else 0.0
        if s.feedback:
            g = torch.full((1, *shape_of(s.dst)), float(self.maxabs(s.dst)), dtype=torch.float64)
            for (r, ir), ctx in zip(reversed(steps), reversed(ctxs)):
                g = r.core_adjoint_bound(ir, g, ctx, W)
            worst = max(worst, float(g.abs().max()) * mult)
        limit = (1 << (ACC_BITS - 1)) - 1
        if worst > limit:
            raise AccumulatorOverflow(
                f"{self.source}: {w}: worst-case accumulator 2^{math.log2(worst):.1f} "
                f"overflows the {ACC_BITS}-bit accumulator (a weight exponent or mantissa "
                f"width too large)", math.log2(worst) - math.log2(limit))
        if total_shift < 0 and worst * 2.0 ** (-total_shift) > limit:
            raise AccumulatorOverflow(
                f"{self.source}: {w}: left shift by {-total_shift} overflows the {ACC_BITS}-bit "
                f"accumulator (a weight exponent is too large)",
                math.log2(worst) - total_shift - math.log2(limit))
        if not SHIFT_RANGE[0] <= total_shift <= SHIFT_RANGE[1]:
            fail(w, f"total shift {total_shift} out of range {SHIFT_RANGE} (a weight exponent "
                    f"is out of scale)")
        self.current_traces(s, w, W, mult)

    def current_traces(self, s, w: str, W: dict, mult: int) -> None:
        """A direction that reads spikes keeps a current trace I <- I - round_shift(I, K)
        + a * 2^F (a: the chain at the spikes); |I| stays below max|a| * 2^(F + K) + 2^K,
        and max|a| is the chain over |M| at all-ones spikes."""
        F = self.prog.frac_bits
        limit = (1 << (ACC_BITS - 1)) - 1
        for fb in (False, True) if s.feedback else (False,):
            if not reads_spikes(self.prog, s, fb):
                continue
            read = s.dst if fb else s.src
            k = self.groups[read].tau_shift
            x = torch.ones((1, *self.shape_of(s.src)), dtype=torch.float64)
            steps = [O.core_op(op) for op in s.ops]
            ctxs = []
            for r, ir in steps:
                x, ctx = r.core_forward(ir, x, W)
                ctxs.append(ctx)
            if fb:
                x = torch.ones((1, *self.shape_of(s.dst)), dtype=torch.float64)
                for (r, ir), ctx in zip(reversed(steps), reversed(ctxs)):
                    x = r.core_adjoint_bound(ir, x, ctx, W)
            worst = (float(x.abs().max()) * (1 << (F + k)) + (1 << k)) * mult \
                if x.numel() else 0.0
            if worst > limit:
                raise AccumulatorOverflow(
                    f"{self.source}: {w}: worst-case spike current trace 2^"
                    f"{math.log2(worst):.1f} ({'feedback' if fb else 'forward'}, tau_shift="
                    f"{k}) overflows the {ACC_BITS}-bit accumulator",
                    math.log2(worst) - math.log2(limit))

    # ---- costs, phases, learning
    def costs(self) -> None:
        prog, fail, groups, shape_of = self.prog, self.fail, self.groups, self.shape_of
        for c in prog.costs:
            w = f".cost {c.name}"
            if c.group not in groups:
                fail(w, f"unknown group {c.group}")
            if c.target != "label":
                if c.target not in groups or groups[c.target].role != "teacher":
                    fail(w, f"target {c.target} is neither 'label' nor a teacher group")
                if shape_of(c.target) != shape_of(c.group):
                    fail(w, f"target {c.target} has a different shape from {c.group}")
            elif groups[c.group].role not in ("output", "tap"):
                fail(w, f"a label cost needs an output or tap group, {c.group} is "
                        f"{groups[c.group].role}")
            if not 0 <= c.wq < (1 << 16):
                fail(w, f"wq={c.wq} out of range 0..65535")
        if not prog.costs:
            fail(".cost", "no cost: the nudged phases need one")

    def phases(self) -> None:
        prog, fail, groups = self.prog, self.fail, self.groups
        seen_phases = set()
        settled = {g.name for g in prog.groups if g.role != "teacher"}
        teachers = {g.name for g in prog.groups if g.role == "teacher"}
        for ph in prog.phases:
            w = f".phase {ph.name}"
            if ph.name not in PHASES:
                fail(w, f"unknown phase (supported: {', '.join(PHASES)})")
            if ph.name in seen_phases:
                fail(w, "given twice")
            seen_phases.add(ph.name)
            if not 1 <= ph.sweeps <= MAX_SWEEP_CAP:
                fail(w, f"sweeps={ph.sweeps} out of range 1..{MAX_SWEEP_CAP}")
            names = [n for cls in ph.classes for n in cls]
            for n in names:
                if n not in groups:
                    fail(w, f"update of unknown group {n}")
            if len(set(names)) != len(names):
                dup = next(n for n in names if names.count(n) > 1)
                fail(w, f"group {dup} updated twice per sweep")
            want = teachers if ph.name == "teacher" else settled
            if set(names) != want:
                miss = sorted(want - set(names)) or sorted(set(names) - want)
                kind = "teacher" if ph.name == "teacher" else "settled"
                fail(w, f"must update exactly the {kind} groups once per sweep "
                        f"(check {miss[0]})")
            if ph.hold_pool and ph.name not in ("nudge+", "nudge-"):
                fail(w, "pool=free (keep the free phase's max-pool winners) is for nudged phases")
            if ph.name == "teacher" and ph.sweeps != 1:
                fail(w, "the teacher pass is one feedforward sweep (sweeps=1)")
            self.spiking_phase(ph, w)
        for need in ("free", "nudge+", "nudge-"):
            if need not in seen_phases:
                fail(f".phase {need}", "missing")
        if teachers and "teacher" not in seen_phases:
            fail(".phase teacher", "missing (the program has teacher groups)")

    def spiking_phase(self, ph, w: str) -> None:
        """A program with bernoulli groups runs each settling phase for exactly its
        `sweeps` time steps and averages the last `mean`; nudged phases say where their
        spike words come from. A rate program has neither."""
        fail = self.fail
        settling = ph.name != "teacher"
        if not self.prog.stochastic or not settling:
            if ph.mean or ph.noise:
                fail(w, "mean= and noise= are for the settling phases of a program with "
                        "bernoulli groups")
            return
        if not 1 <= ph.mean <= ph.sweeps:
            fail(w, f"mean={ph.mean}: a stochastic phase averages its last 1..{ph.sweeps} "
                    f"time steps (sweeps={ph.sweeps})")
        if ph.name == "free" and ph.noise:
            fail(w, "noise= is for the nudged phases")
        if ph.name in ("nudge+", "nudge-") and ph.noise not in NOISES:
            fail(w, f"noise={ph.noise or '(missing)'} (supported: {', '.join(NOISES)})")

    def learn(self) -> None:
        prog, fail, syns = self.prog, self.fail, self.syns
        bias_mems = {g.bias for g in prog.groups if g.bias and g.role != "teacher"}
        for n in prog.learn:
            if n in syns:
                s = syns[n]
                if not s.learn or not any(op.w for op in s.ops):
                    fail(f".learn {n}", "synapse is frozen or has no weights")
            elif n not in bias_mems:
                fail(f".learn {n}", "neither a learnable synapse nor a settled group's bias memory")
