"""The bit-exact simulator of a neuromorphic program (inference and on-chip EP learning).

Every value is an integer; tensors are float64 holding integers, which is exact (all sums
stay far below 2^53, and the validator proves each synapse's 32-bit accumulator cannot
overflow) and much faster than integer dtypes. The arithmetic, step by step, is the one
docs/isa.md documents:

  acc    = chain(M_eff, s_src)                   exact integer sum of products
  term   = round_shift(rmul * acc, shift)         per synapse, round half up
  drive  = sum of terms + bias - nudge            checked against 32 bits (saturate, count)
  s      = clamp(drive, lo, hi)                   the activation; identity / relu states
                                                  saturate at their memory width (counted)

A phase sweeps its colour classes until no state changes (the integer fixed point), a
state vector repeats (a cycle), or the sweep cap. Each sample stops on its own: a sample's
result never depends on the rest of its batch. The walk is runtime/settle.py, shared with
the float engine; this module plugs in the integer arithmetic (`IntSettle`). Max-pools
acting on settled states follow the program's winner rules (docs/isa.md, "Max-pool winners"):
after `pool_freeze` sweeps a still-moving sample's winners are frozen, and `pool=free`
nudged phases (and then the learning step) keep the free phase's winners. Learning applies
the EP update from the two nudged equilibria to the integer mantissas with stochastic
rounding driven by the program's counter-mode PRNG, so a training run is reproducible from
the program alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from epc.compiler import ops as O

from .settle import settle_walk

# the program data model lives with the target; the simulator only reads it
from epc.targets.neuromorphic.isa import (ACC_BITS, BETA_FRAC, COST_WEIGHT_FRAC, Program,
                                          reads_spikes)

EXP_MAX = 31
ACC_MAX = float((1 << (ACC_BITS - 1)) - 1)
ACC_MIN = float(-(1 << (ACC_BITS - 1)))


# --------------------------------------------------------------------------- arithmetic
def round_shift(x: torch.Tensor, sh: int) -> torch.Tensor:
    """x / 2^sh rounded half up (sh > 0); exact left shift for sh <= 0."""
    if sh <= 0:
        return x * float(1 << -sh)
    return torch.floor((x + float(1 << (sh - 1))) / float(1 << sh))


_M32 = np.uint64(0xFFFFFFFF)


def hash32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer mixer (xorshift-multiply, 'lowbias32'); the PRNG's core."""
    x = np.asarray(x, dtype=np.uint64) & _M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _M32
    x ^= x >> np.uint64(16)
    return x


def prng_words(seed: int, step: int, stream: int, n: int) -> np.ndarray:
    """n 32-bit words for learning step `step` and memory `stream` (counter mode:
    word_i = hash32(key ^ i), key = hash32(seed + 0x9E3779B9 * (step + 1) ^ hash32(stream)))."""
    k = (int(seed) + 0x9E3779B9 * (int(step) + 1)) & 0xFFFFFFFF
    key = int(hash32(np.array([k ^ int(hash32(np.array([stream]))[0])]))[0])
    return hash32(np.arange(n, dtype=np.uint64) ^ np.uint64(key))


def stochastic_shift(num: torch.Tensor, sh: int, words: np.ndarray) -> torch.Tensor:
    """floor((num + r) / 2^sh) with r uniform in [0, 2^sh) from 32-bit PRNG words."""
    if sh <= 0:
        return num * float(1 << -sh)
    r = torch.as_tensor(words.astype(np.float64), dtype=torch.float64).reshape(num.shape)
    r = torch.floor(r / float(1 << (32 - sh))) if sh <= 32 else r * float(1 << (sh - 32))
    return torch.floor((num + r) / float(1 << sh))


# --------------------------------------------------------------------------- chains
@dataclass
class _Chain:
    """A synapse prepared for execution: IR ops over effective mantissas + output scale."""

    name: str
    src: str
    dst: str
    kind: str
    feedback: bool
    learn: bool
    steps: list            # (SynOp, its op registry rule, the IR op it executes as)
    mult: float
    shift: int
    piecewise: bool        # has a max-pool: its winners follow the source
    weights: list[tuple[str, int]] = field(default_factory=list)   # (memory, e_min)


@dataclass
class Stats:
    """Counters of one simulator run."""

    overflow_acc: int = 0        # synapse accumulators beyond 32 bits (saturated)
    overflow_state: int = 0      # identity/relu states saturated at their memory width
    overflow_weight: int = 0     # learned mantissas saturated
    overflow_bias: int = 0
    synops: int = 0              # multiply-accumulates executed
    renormalizations: int = 0    # exponent raises by the learning step
    spike_events: int = 0        # spikes delivered over synapses: additions (bernoulli groups)
    spikes: int = 0              # spikes fired
    spike_unit_steps: int = 0    # bernoulli units x rows x time steps (spike rate: the ratio)

    @property
    def overflows(self) -> int:
        return self.overflow_acc + self.overflow_state + self.overflow_weight + self.overflow_bias

    def as_dict(self) -> dict:
        return {"accumulator": self.overflow_acc, "state": self.overflow_state,
                "weight": self.overflow_weight, "bias": self.overflow_bias}


@dataclass
class PhaseResult:
    states: dict
    sweeps: np.ndarray          # per sample: sweeps run (the last one changed nothing if settled)
    settled: np.ndarray         # bool per sample: reached the integer fixed point
    cycled: np.ndarray          # bool per sample: a state vector repeated (a cycle)
    routing: dict | None = None  # per pooled synapse: max-pool winners per sample at the end
                                 # (the frozen ones where frozen); None without such pools
    froze: np.ndarray | None = None   # bool per sample: winners were frozen in this phase
    # programs with bernoulli groups: `states` are the phase's means; `carry` is where a
    # phase continuing it starts (its last step: rates, traces, spikes, currents, generators)
    carry: dict | None = None


class Simulator:
    """Executes a validated Program. Not thread-safe; cheap to construct."""

    def __init__(self, prog: Program, *, renormalize: bool = True):
        self.p = prog
        self.renormalize = renormalize
        self.F = prog.frac_bits
        self.stats = Stats()
        self.groups = {g.name: g for g in prog.groups}
        self.mems = {m.name: m for m in prog.memories}
        self.costs = prog.costs
        self._shape_cache: dict = {}
        self._build()

    # ---- setup
    def _build(self) -> None:
        p = self.p
        self.W: dict[str, torch.Tensor] = {}
        self.emin: dict[str, int] = {}
        for m in p.memories:
            if m.kind == "weight":
                self._load_weight(m.name)
        self.bias = {g.name: torch.as_tensor(self.mems[g.bias].data, dtype=torch.float64)
                     for g in p.groups if g.bias}
        self.chains: list[_Chain] = []
        wexp = {op.w: op.e for s in p.synapses for op in s.ops if op.w}
        self.wexp = wexp
        for s in p.synapses:
            steps = [(op, *O.core_op(op)) for op in s.ops]
            shift = sum(op.rshift for op in s.ops)
            mult = 1
            ws = []
            for op in s.ops:
                mult *= op.rmul
                if op.w:
                    shift -= self.emin[op.w]
                    ws.append((op.w, self.emin[op.w]))
            self.chains.append(_Chain(s.name, s.src, s.dst, s.kind, s.feedback, s.learn, steps,
                                      float(mult), shift, any(r.piecewise for _, r, _ in steps),
                                      ws))
        # teacher groups are driven by teacher synapses only, the others never by them
        self.inbound = {g: [c for c in self.chains if c.dst == g and
                            (c.kind == "teacher") == (self.groups[g].role == "teacher")]
                        for g in self.groups}
        self.feedback = {g: [c for c in self.chains if c.src == g and c.feedback]
                         for g in self.groups}
        self.macs = {c.name: self._chain_macs(c) for c in self.chains}
        # synapses whose max-pool acts on a settled state: the winner rules apply to them
        # (pools on clamped inputs or teacher groups see a constant source)
        self.pooled = [c for c in self.chains if c.piecewise and c.kind != "teacher"
                       and c.src in self.groups and self.groups[c.src].role != "teacher"]
        self._build_spiking()
        rng = np.random.default_rng(12345)   # hash coefficients for cycle detection only
        self._hcoef = {g: torch.as_tensor(rng.integers(1, 2 ** 20, size=int(np.prod(
            self.mems[self.groups[g].mem].shape))).astype(np.float64)) for g in self.groups}

    def _build_spiking(self) -> None:
        """Bernoulli groups (docs/isa.md, Spikes): which synapse directions read spikes,
        and the synapses each unit of a read group reaches through them (one synaptic
        event per spike and synapse)."""
        p = self.p
        self.bernoulli = [g.name for g in p.groups if g.neuron == "bernoulli"]
        self.group_index = {g.name: k for k, g in enumerate(p.groups)}
        syn = {s.name: s for s in p.synapses}
        self.spike_read = {(c.name, fb): reads_spikes(p, syn[c.name], fb)
                           for c in self.chains for fb in (False, True)
                           if (not fb or c.feedback) and c.kind != "teacher"}
        self.fanout: dict = {}
        for (name, fb), yes in self.spike_read.items():
            if not yes:
                continue
            c = next(x for x in self.chains if x.name == name)
            ones = {**self.W, **{w: torch.ones_like(self.W[w]) for w, _ in c.weights}}
            y, ctxs = self._forward(c, torch.ones((1, *self._shape(c.src)),
                                                  dtype=torch.float64), W=ones)
            if fb:        # each destination unit reaches the synapses of its chain row
                self.fanout[(name, fb)] = y
            else:         # each source unit those of its column: the adjoint at ones
                g = torch.ones_like(y)
                for (_, r, ir), ctx in zip(reversed(c.steps), reversed(ctxs)):
                    g = r.core_adjoint(ir, g, ctx, ones)
                self.fanout[(name, fb)] = g

    def _shape(self, name: str) -> tuple:
        return tuple(self.mems[self.groups[name].mem].shape if name in self.groups
                     else self.mems[name].shape)

    def _load_weight(self, name: str) -> None:
        m = self.mems[name]
        en = next((op.e for s in self.p.synapses for op in s.ops if op.w == name), None)
        e = self.mems[en].data.astype(np.int64) if en else np.zeros(1, np.int64)
        emin = int(e.min())
        M = m.data.astype(np.float64)
        if e.size > 1:
            M = M * (2.0 ** (e - emin)).reshape((-1,) + (1,) * (M.ndim - 1))
        self.W[name] = torch.as_tensor(M)
        self.emin[name] = emin

    def _rescale_chains(self, w: str) -> None:
        """After an exponent change of weight memory w: recompute the chains' shifts."""
        for c in self.chains:
            if any(n == w for n, _ in c.weights):
                c.shift = sum(op.rshift for op, _, _ in c.steps) - sum(
                    self.emin[n] for n, _ in c.weights)
                c.weights = [(n, self.emin[n]) for n, _ in c.weights]

    def _chain_macs(self, c: _Chain) -> int:
        shape = tuple(self.mems[self.groups[c.src].mem].shape if c.src in self.groups
                      else self.mems[c.src].shape)
        x = torch.zeros((1, *shape), dtype=torch.float64)
        total = 0
        for _, r, ir in c.steps:
            y, _ = r.core_forward(ir, x, self.W)
            total += r.core_synops(ir, tuple(x.shape[1:]), tuple(y.shape[1:]), self.W)
            x = y
        return total

    # ---- one synapse
    def _scale(self, v: torch.Tensor, c: _Chain, extra: int = 0) -> torch.Tensor:
        if c.mult != 1.0:
            v = v * c.mult
        over = (v > ACC_MAX) | (v < ACC_MIN)
        if bool(over.any()):
            self.stats.overflow_acc += int(over.sum())
            v = v.clamp(ACC_MIN, ACC_MAX)
        return round_shift(v, c.shift + extra)

    def _forward(self, c: _Chain, x: torch.Tensor, route: list | None = None,
                 W: dict | None = None) -> tuple[torch.Tensor, list]:
        W = self.W if W is None else W
        ctxs = []
        for k, (_, r, ir) in enumerate(c.steps):
            if route is not None and route[k] is not None:
                x, ctx = r.forward_frozen(ir, x, route[k])
            else:
                x, ctx = r.core_forward(ir, x, W)
            ctxs.append(ctx)
        return x, ctxs

    def _adjoint(self, c: _Chain, g: torch.Tensor, src: torch.Tensor,
                 route: list | None = None) -> torch.Tensor:
        if c.piecewise and route is None:
            _, ctxs = self._forward(c, src)
        else:
            # shapes only (with frozen winners: and the recorded indices), no arithmetic
            ctxs, shape = [], tuple(src.shape)
            for k, (op, r, ir) in enumerate(c.steps):
                if route is not None and route[k] is not None:
                    ctxs.append(r.frozen_context(ir, shape, route[k], torch.float64))
                else:
                    ctxs.append(r.core_shape_context(ir, shape))
                shape = self._out_shape(op, r, ir, shape)
        for (_, r, ir), ctx in zip(reversed(c.steps), reversed(ctxs)):
            g = r.core_adjoint(ir, g, ctx, self.W)
        return g

    def _out_shape(self, op, r, ir, shape):
        key = (id(op), shape)
        got = self._shape_cache.get(key)
        if got is None:
            y, _ = r.core_forward(ir, torch.zeros((1, *shape[1:]), dtype=torch.float64), self.W)
            got = (shape[0], *y.shape[1:])
            self._shape_cache[key] = got
        return got

    # ---- max-pool winners
    def routing(self, s: dict) -> dict | None:
        """The current winners (argmax, first index on ties) of every pooled synapse at `s`:
        {synapse: [indices or None per op]}; None when the program has no pooled synapse."""
        if not self.pooled:
            return None
        out = {}
        for c in self.pooled:
            _, ctxs = self._forward(c, s[c.src])
            out[c.name] = [r.freeze(ir, ctx) if r.piecewise else None
                           for (_, r, ir), ctx in zip(c.steps, ctxs)]
        return out

    @staticmethod
    def _route_take(route: dict | None, idx) -> dict | None:
        if route is None:
            return None
        return {k: [None if t is None else t[idx] for t in v] for k, v in route.items()}

    @staticmethod
    def _route_put(dst: dict, at, src: dict) -> None:
        for k, v in src.items():
            for d, t in zip(dst[k], v):
                if d is not None:
                    d[at] = t

    # ---- one group
    def _drive(self, name: str, s: dict, sign: int, y: torch.Tensor | None,
               route: dict | None = None, spk: "_Spikes | None" = None) -> torch.Tensor:
        grp = self.groups[name]
        n = next(iter(s.values())).shape[0]
        u = None
        for c in self.inbound[name]:
            rc = route.get(c.name) if route is not None else None
            if spk is not None and self.spike_read.get((c.name, False)):
                t = self._spike_term(c, False, spk, s, rc)
            elif spk is not None and c.src not in self.groups:
                # a clamped input is constant: a spiking core applies its chain once per
                # sample and holds the term (carried into the nudged phases)
                t = spk.I.get((c.name, "input"))
                if t is None:
                    t = spk.I[(c.name, "input")] = self._scale(
                        self._forward(c, s[c.src], rc)[0], c)
                    self.stats.synops += self.macs[c.name] * n
            else:
                t = self._scale(self._forward(c, s[c.src], rc)[0], c)
                self.stats.synops += self.macs[c.name] * n
            u = t if u is None else u + t
        if grp.role != "teacher":
            for c in self.feedback[name]:
                rc = route.get(c.name) if route is not None else None
                if spk is not None and self.spike_read.get((c.name, True)):
                    t = self._spike_term(c, True, spk, s, rc)
                else:
                    t = self._scale(self._adjoint(c, s[c.dst], s[name], rc), c)
                    self.stats.synops += self.macs[c.name] * n
                u = t if u is None else u + t
        shape = (n, *self.mems[grp.mem].shape)
        if u is None:
            u = torch.zeros(shape, dtype=torch.float64)
        if grp.bias:
            u = u + self.bias[name]
        if sign and grp.role != "teacher":
            for cost in self.costs:
                if cost.group != name:
                    continue
                tgt = y if cost.target == "label" else s[cost.target]
                k = BETA_FRAC + COST_WEIGHT_FRAC
                nudge = round_shift(float(self.p.beta_q * cost.wq) * (s[name] - tgt), k)
                u = u - sign * nudge
        over = (u > ACC_MAX) | (u < ACC_MIN)
        if bool(over.any()):
            self.stats.overflow_acc += int(over.sum())
            u = u.clamp(ACC_MIN, ACC_MAX)
        if grp.act != "clip":
            # identity / relu: a bound is the memory's range, so hitting it is saturation
            sat = u > grp.hi
            if grp.act == "identity":
                sat = sat | (u < grp.lo)
            if bool(sat.any()):
                self.stats.overflow_state += int(sat.sum())
        v = u.clamp(float(grp.lo), float(grp.hi))
        if spk is not None and grp.neuron == "bernoulli":
            return self._fire(name, v, spk)
        return v

    # ---- spikes (docs/isa.md, Spikes)
    def _spike_term(self, c: _Chain, fb: bool, spk: "_Spikes", s: dict,
                    route: list | None) -> torch.Tensor:
        """A spike-reading direction's term: the chain at the read group's last spikes
        (0/1: a sum of the mantissas of the firing units' synapses, additions only) into
        the direction's current trace I <- I - round_shift(I, K) + a * 2^F, which is
        scaled like an accumulator with K more bits of shift."""
        read = c.dst if fb else c.src
        z = spk.Z[read]
        a = self._adjoint(c, z, s[c.src], route) if fb else self._forward(c, z, route)[0]
        self.stats.spike_events += int((z * self.fanout[(c.name, fb)]).sum())
        k = self.groups[read].tau_shift
        key = (c.name, fb)
        cur = spk.I.get(key)
        add = a * float(1 << self.F)
        cur = add if cur is None else cur - round_shift(cur, k) + add
        spk.I[key] = cur
        return self._scale(cur, c, k)

    def _fire(self, name: str, p: torch.Tensor, spk: "_Spikes") -> torch.Tensor:
        """Bernoulli group `name` at its turn of a time step: each unit's xorshift32
        generator advances once; the unit fires where the word's top F bits (uniform in
        [0, 2^F)) are below its probability p (2^F = 1); then its trace A <- A -
        round_shift(A, K) + z * 2^F, and its state (what the learning step and rate
        readers see) the rate min(round_shift(A, K), hi)."""
        grp = self.groups[name]
        x = xorshift32(spk.X[name])
        spk.X[name] = x
        top = torch.as_tensor((x >> np.uint64(32 - self.F)).astype(np.float64))
        z = (top.reshape(p.shape) < p).to(torch.float64)
        k = grp.tau_shift
        a = spk.A[name]
        a = a - round_shift(a, k) + z * float(1 << self.F)
        # the spikes are seen from the next colour class on (a block update reads one
        # snapshot): SpikeSettle publishes them at the class boundary
        spk.A[name], spk.pending[name] = a, z
        self.stats.spikes += int(z.sum())
        self.stats.spike_unit_steps += int(z.numel())
        return round_shift(a, k).clamp(max=float(grp.hi))

    def spike_generators(self, ids: np.ndarray, ctx: int, stream: int) -> dict:
        """Every bernoulli group's xorshift32 states, [rows, units] (uint64 holding 32
        bits): x0 = H(H(H(H(spike_seed ^ H(ctx)) ^ id) ^ H(stream << 16 | g)) ^ unit), or
        spike_seed where that is 0 (docs/isa.md)."""
        out = {}
        seed = int(self.p.spike_seed) & 0xFFFFFFFF
        k0 = hash32(np.array([seed ^ int(hash32(np.array([ctx & 0xFFFFFFFF]))[0])]))[0]
        rows = hash32((np.asarray(ids, dtype=np.uint64) & _M32) ^ k0)
        for name in self.bernoulli:
            g = self.group_index[name]
            sg = hash32(np.array([((stream & 0xFFFF) << 16) | (g & 0xFFFF)]))[0]
            key = hash32(rows ^ sg)
            units = int(np.prod(self._shape(name)))
            x = hash32(key[:, None] ^ np.arange(units, dtype=np.uint64)[None, :])
            out[name] = np.where(x == 0, np.uint64(seed), x)
        return out

    # ---- phases
    def _hash(self, s: dict, names: list[str]) -> np.ndarray:
        h = None
        for g in names:
            v = s[g].reshape(s[g].shape[0], -1)
            k = (v * self._hcoef[g]).sum(1) + (v * v).sum(1) * 3.0
            h = k if h is None else h * 1000003.0 + k
            h = torch.remainder(h, 2.0 ** 52)
        return h.numpy()

    def settle(self, s: dict, phase: str, *, y: torch.Tensor | None = None,
               sign: int = 0, routing: dict | None = None, ids=None, ctx: int = 0,
               carry: dict | None = None) -> PhaseResult:
        """Run one phase on the batch `s` (a dict of [N, ...] integer tensors).

        Programs with bernoulli groups: see `_settle_spiking` (ids, ctx, carry).

        `routing` (per sample, e.g. a free phase's `PhaseResult.routing`) freezes every
        pooled synapse's winners from the first sweep; otherwise they follow the current
        source and, for samples still moving after the program's `pool_freeze` sweeps, are
        frozen there. Cycles are looked for only while winners are frozen (or when the
        program never freezes them): before the freeze the float runtime keeps sweeping
        too, and a repeat under live winners is what the freeze resolves."""
        ph = self.p.phase(phase)
        if ph.mean:
            return self._settle_spiking(s, ph, y, sign, routing, ids, ctx, carry)
        out = {k: v.clone() for k, v in s.items()}
        n = next(iter(out.values())).shape[0]
        pooled = bool(self.pooled) and phase != "teacher"
        run = IntSettle(self, out, [g for cls in ph.classes for g in cls], sign, y,
                        routing if pooled else None, detect=phase != "teacher")
        # winners freeze after pool_freeze sweeps (0: never), unless they came frozen
        freeze_at = (self.p.pool_freeze or None) if pooled and routing is None else None
        run.detect = run.detect and freeze_at is None
        settle_walk(run, dict(out), ph.classes, max_sweeps=ph.sweeps, tol=0,
                    freeze_at=freeze_at, units=[1] * n)
        if phase == "teacher":
            run.settled[:] = True
        out_route = None
        if pooled:
            out_route = self.routing(out)
            if run.full_route is not None and run.froze.any():
                at = torch.as_tensor(np.nonzero(run.froze)[0])
                self._route_put(out_route, at, self._route_take(run.full_route, at))
        return PhaseResult(out, run.sweeps, run.settled, run.cycled, out_route, run.froze)

    def _settle_spiking(self, s: dict, ph, y, sign: int, routing: dict | None, ids,
                        ctx: int, carry: dict | None) -> PhaseResult:
        """A phase of a program with bernoulli groups (docs/isa.md, Spikes): exactly its
        `sweeps` time steps from `s`, or, given a previous phase's `carry`, from where that
        phase ended; the result is each settled group's mean over the last `mean` steps.
        ids: each row's sample id, ctx: 0 for inference, rng_step + 1 in a learning step
        (what seeds the generators; default ids: the rows' positions). The batch is one
        unit: every sample runs every step, and the samples never interact."""
        n = next(iter(s.values())).shape[0]
        ids = np.arange(n, dtype=np.uint64) if ids is None else np.asarray(ids, np.uint64)
        if carry is None:
            start = dict(s)
            zeros = {g: torch.zeros_like(start[g]) for g in self.bernoulli}
            spk = _Spikes(self.spike_generators(ids, ctx, 0), dict(zeros), dict(zeros), {})
        else:
            start = {**s, **carry["states"]}
            X = ({g: x.copy() for g, x in carry["X"].items()} if ph.noise != "own" else
                 self.spike_generators(ids, ctx, 1 if ph.name == "nudge+" else 2))
            spk = _Spikes(X, dict(carry["A"]), dict(carry["Z"]), dict(carry["I"]))
        pooled = bool(self.pooled)
        names = [g for cls in ph.classes for g in cls]
        run = SpikeSettle(self, spk, ph.classes, sign, y, routing if pooled else None,
                          ph.sweeps - ph.mean)
        # a spiking phase never settles, so a freeze after pool_freeze steps would always
        # fire, mid-transient on a noisy estimate: its winners stay live (as the float
        # runtime's stochastic phases), and the ones handed on are those of its mean
        S = dict(start)
        settle_walk(run, S, ph.classes, max_sweeps=ph.sweeps, tol=-1.0, freeze_at=None,
                    observe=run.observe)
        rmul, rshift = O.fixed_point_reciprocal(int(ph.mean))
        out = dict(run.last)
        for g, v in run.sums.items():
            out[g] = round_shift(v * float(rmul), rshift)
        out_route = None
        if pooled:
            out_route = run.route if run.route is not None else self.routing(out)
        froze = np.full(n, routing is not None)
        keep = {"states": {g: run.last[g] for g in names}, "X": spk.X, "A": spk.A,
                "Z": spk.Z, "I": spk.I}
        return PhaseResult(out, np.full(n, ph.sweeps, dtype=np.int64), np.ones(n, bool),
                           np.zeros(n, bool), out_route, froze, keep)

    # ---- inference
    def init_states(self, x: np.ndarray | torch.Tensor) -> dict:
        """Quantize a float input batch to the input memory and zero every state."""
        xin = self.p.inputs[0]
        mem = self.mems[xin]
        xt = torch.as_tensor(np.asarray(x, dtype=np.float64))
        q = torch.floor(xt * float(1 << self.F) + 0.5)
        over = (q > mem.hi) | (q < mem.lo)
        if bool(over.any()):
            self.stats.overflow_state += int(over.sum())
        s = {xin: q.clamp(mem.lo, mem.hi).reshape(len(xt), *mem.shape)}
        for g in self.p.groups:
            s[g.name] = torch.zeros((len(xt), *self.mems[g.mem].shape), dtype=torch.float64)
        if self.p.phase("teacher"):
            s = self.settle(s, "teacher").states
        return s

    def free(self, x, ids=None, ctx: int = 0) -> PhaseResult:
        """The free phase on input batch x (`ids`, `ctx`: what seeds a bernoulli program's
        spike generators; default: the rows' positions, inference)."""
        return self.settle(self.init_states(x), "free", ids=ids, ctx=ctx)

    def predict(self, x, ids=None) -> tuple[np.ndarray, PhaseResult]:
        r = self.free(x, ids)
        out = self.p.output_group().name
        return r.states[out].reshape(len(x), -1).argmax(1).numpy(), r

    def label_target(self, labels: np.ndarray) -> torch.Tensor:
        out = self.p.output_group()
        shape = self.mems[out.mem].shape
        y = torch.zeros((len(labels), int(np.prod(shape))), dtype=torch.float64)
        y[torch.arange(len(labels)), torch.as_tensor(labels, dtype=torch.long)] = float(1 << self.F)
        return y.reshape(len(labels), *shape)

    # ---- learning
    def _corr(self, c: _Chain, s: dict, routing: dict | None = None) -> dict[str, torch.Tensor]:
        """d<s_dst, chain(s_src)>/dM_eff summed over the batch: exact integer correlations
        (with `routing`, the chain's max-pools use those winners)."""
        leaves = {w: self.W[w].clone().requires_grad_(True) for w, _ in c.weights}
        W = {**self.W, **leaves}
        rc = routing.get(c.name) if routing is not None else None
        x, _ = self._forward(c, s[c.src], rc, W)
        phi = (x * s[c.dst]).sum()
        gs = torch.autograd.grad(phi, list(leaves.values()))
        return dict(zip(leaves, gs))

    def learn_step(self, sp: dict, sm: dict, *, lr_shift: int | None = None,
                   routing: dict | None = None) -> None:
        """Apply the EP update from the nudged equilibria s+ and s- to the integer memories
        (`routing`: the max-pool winners both phases held, docs/isa.md `pool=free`)."""
        p = self.p
        lr = p.lr_shift if lr_shift is None else int(lr_shift)
        F = self.F
        learn = set(p.learn)
        # weights: per memory, sum the contributions of every learned synapse using it
        contrib: dict[str, list[tuple[torch.Tensor, int]]] = {}
        for c in self.chains:
            if c.name not in learn:
                continue
            gp, gm = self._corr(c, sp, routing), self._corr(c, sm, routing)
            S = c.shift
            for w, emin in c.weights:
                d = (gp[w] - gm[w]) * c.mult
                contrib.setdefault(w, []).append((d, lr + 2 * F + S + emin))
                self.stats.synops += int(np.prod(self.W[w].shape)) * 2 * sp[c.src].shape[0]
        for stream, (w, parts) in enumerate(sorted(contrib.items())):
            self._update_weight(w, parts, stream)
        self._update_biases(sp, sm, lr, learn)
        p.rng_step += 1

    def _update_weight(self, w: str, parts: list, stream: int) -> None:
        """Weight memory w += its EP update: the parts (d, b) of every learned synapse using
        it, stochastically rounded with PRNG stream `stream`, renormalised or saturated."""
        p = self.p
        m = self.mems[w]
        e = self.mems[self.wexp[w]].data.astype(np.int64)
        # a part d stands for d * 2^-(b + e_o) mantissa units (e_o: the channel's
        # exponent); align the parts on the largest b so the sum stays an integer
        base = max(b for _, b in parts)
        num = sum(d * float(2 ** (base - b)) for d, b in parts)
        words = prng_words(p.seed, p.rng_step, stream, m.size)
        if e.size == 1:
            dm = stochastic_shift(num, base + int(e[0]), words)
        else:
            sh = np.broadcast_to(e.reshape((-1,) + (1,) * (len(m.shape) - 1)), m.shape)
            dm = torch.empty_like(num)
            for v in np.unique(e):
                mask = sh == v
                mt = torch.as_tensor(mask)
                dm[mt] = stochastic_shift(num[mt], base + int(v), words[mask.reshape(-1)])
        newm = torch.as_tensor(m.data, dtype=torch.float64) + dm
        qmax = float((1 << (m.bits - 1)) - 1)
        sat = (newm > qmax) | (newm < -qmax)
        if bool(sat.any()) and self.renormalize:
            # exponent renormalisation: a saturating channel (or memory) halves its
            # mantissas (rounding shift) and raises its exponent, so learning can grow
            # a weight past the range chosen at compile time instead of clipping it
            em = self.mems[self.wexp[w]]
            ed = em.data.astype(np.int64).reshape(-1).copy()
            if ed.size == 1:
                rows = torch.ones(newm.shape[0], dtype=torch.bool) if ed[0] < EXP_MAX \
                    else torch.zeros(newm.shape[0], dtype=torch.bool)
            else:
                rows = sat.reshape(newm.shape[0], -1).any(1) & torch.as_tensor(ed < EXP_MAX)
            if bool(rows.any()):
                if ed.size == 1:
                    ed[0] += 1
                else:
                    ed[rows.numpy()] += 1
                newm[rows] = round_shift(newm[rows], 1)
                em.data = ed.reshape(em.shape)
                self.stats.renormalizations += int(rows.sum()) if ed.size > 1 else 1
            sat = (newm > qmax) | (newm < -qmax)
        self.stats.overflow_weight += int(sat.sum())
        m.data = newm.clamp(-qmax, qmax).numpy().astype(np.int64)
        self._load_weight(w)
        self._rescale_chains(w)

    def _update_biases(self, sp: dict, sm: dict, lr: int, learn: set) -> None:
        """Every learned group bias += (s+ - s-) summed over the batch and the axes it
        broadcasts over, shifted right by lr with stochastic rounding, saturated."""
        p = self.p
        for k, g in enumerate(p.groups):
            if not g.bias or g.bias not in learn:
                continue
            bm = self.mems[g.bias]
            d = sp[g.name] - sm[g.name]
            b = torch.as_tensor(bm.data, dtype=torch.float64)
            d = d.sum(0)
            while d.dim() > b.dim():
                d = d.sum(0)
            for ax in range(b.dim()):
                if b.shape[ax] == 1 and d.shape[ax] != 1:
                    d = d.sum(ax, keepdim=True)
            words = prng_words(p.seed, p.rng_step, 1000 + k, bm.size)
            nb = b + stochastic_shift(d, lr, words)
            sat = (nb > bm.hi) | (nb < bm.lo)
            self.stats.overflow_bias += int(sat.sum())
            bm.data = nb.clamp(bm.lo, bm.hi).numpy().astype(np.int64)
            self.bias[g.name] = torch.as_tensor(bm.data, dtype=torch.float64)

    def train_batch(self, x, labels, *, lr_shift: int | None = None,
                    beta_q: int | None = None) -> tuple[PhaseResult, PhaseResult, PhaseResult]:
        if beta_q is not None:
            self.p.beta_q = int(beta_q)
        y = self.label_target(labels)
        # a bernoulli program's spikes in a learning step: seeded by the step and each
        # sample's position in the batch (inference uses ctx 0 and the sample's index)
        ids, ctx = np.arange(len(labels), dtype=np.uint64), self.p.rng_step + 1
        free = self.free(x, ids, ctx)
        hp, hm = self.p.phase("nudge+").hold_pool, self.p.phase("nudge-").hold_pool
        sp = self.settle(free.states, "nudge+", y=y, sign=+1, routing=free.routing if hp else None,
                         ids=ids, ctx=ctx, carry=free.carry)
        sm = self.settle(free.states, "nudge-", y=y, sign=-1, routing=free.routing if hm else None,
                         ids=ids, ctx=ctx, carry=free.carry)
        # the gradient is taken on the piece both phases settled on, when they shared one
        self.learn_step(sp.states, sm.states, lr_shift=lr_shift,
                        routing=free.routing if hp and hm else None)
        return free, sp, sm


class IntSettle:
    """The integer arithmetic of one simulator phase (what `runtime.settle.settle_walk`
    plugs in): each sample is a unit of its own, stops at the integer fixed point (no state
    changes: tol 0) or at a cycle, and is written into the phase's result as it stops."""

    detach = False

    def __init__(self, sim: Simulator, out: dict, names: list[str], sign: int,
                 y: torch.Tensor | None, routing: dict | None, detect: bool):
        n = next(iter(out.values())).shape[0]
        self.sim, self.out, self.names, self.sign, self.y = sim, out, names, sign, y
        self.sweeps = np.zeros(n, dtype=np.int64)
        self.settled = np.zeros(n, dtype=bool)
        self.cycled = np.zeros(n, dtype=bool)
        self.froze = np.zeros(n, dtype=bool)
        # the winners every sample holds (frozen from the first sweep when given), per row
        # of the samples still settling
        self.full_route = None
        if routing is not None:
            self.full_route = sim._route_take(routing, slice(None))
            self.froze[:] = True
        self.route = self.full_route
        # cycles are looked for only while winners are frozen (or when the program never
        # freezes them): before the freeze the float runtime keeps sweeping too, and a
        # repeat under live winners is what the freeze resolves
        self.detect = detect
        self.seen: list[set] = [set() for _ in range(n)]

    def drive(self, j: str, S: dict, ver: dict) -> torch.Tensor:
        return self.sim._drive(j, S, self.sign, self.y, self.route)

    def delta_buffer(self, n: int):
        shapes = {g: tuple(self.sim.mems[self.sim.groups[g].mem].shape) for g in self.names}
        widths = {g: int(np.prod(sh)) for g, sh in shapes.items()}
        buf = torch.zeros((n, sum(widths.values())), dtype=torch.float64)
        cols, at = {}, 0
        for g in self.names:
            cols[g] = buf[:, at:at + widths[g]].view((n,) + shapes[g])
            at += widths[g]
        return buf, cols

    def freeze(self, S: dict, rows: list[int]) -> None:
        """Still moving after pool_freeze sweeps: freeze the winners where they are."""
        self.route = self.sim.routing(S)
        n = len(self.sweeps)
        self.full_route = {c: [None if t is None else torch.zeros((n, *t.shape[1:]), dtype=t.dtype)
                               for t in v] for c, v in self.route.items()}
        self.sim._route_put(self.full_route, torch.as_tensor(rows), self.route)
        self.froze[rows] = True
        self.detect = True

    def take_rows(self, take) -> None:
        self.y = None if self.y is None else take(self.y)
        if self.route is not None:
            self.route = {k: [None if t is None else take(t) for t in v]
                          for k, v in self.route.items()}

    def cycles(self, S: dict, rows: list[int], done: list[bool]) -> list[bool] | None:
        """`done` with the moving samples whose state vector repeats an earlier one set."""
        if not self.detect:
            return None
        hs = self.sim._hash(S, self.names)
        for k, i in enumerate(rows):
            if not done[k]:
                if hs[k] in self.seen[i]:
                    self.cycled[i] = True
                    done[k] = True
                else:
                    self.seen[i].add(hs[k])
        return done

    def finish(self, units, rows, sizes, S: dict, d, sweeps: int, converged) -> None:
        at = torch.as_tensor(units)
        for g in self.names:
            self.out[g][at] = S[g][rows]
        self.sweeps[units] = sweeps
        self.settled[units] = converged


# --------------------------------------------------------------------------- spikes
def xorshift32(x: np.ndarray) -> np.ndarray:
    """One step of Marsaglia's xorshift32 (13, 17, 5) on 32-bit states held in uint64:
    x ^= x << 13; x ^= x >> 17; x ^= x << 5 (mod 2^32). A nonzero state never becomes 0."""
    x = x ^ ((x << np.uint64(13)) & _M32)
    x = x ^ (x >> np.uint64(17))
    return x ^ ((x << np.uint64(5)) & _M32)


@dataclass
class _Spikes:
    """The spiking part of a phase's state: per bernoulli group its generators X, trace A
    and last spikes Z; per spike-reading synapse direction its current trace I."""

    X: dict
    A: dict
    Z: dict
    I: dict
    pending: dict = field(default_factory=dict)   # spikes of the class being updated

    def publish(self) -> None:
        self.Z.update(self.pending)
        self.pending.clear()


class SpikeSettle:
    """The integer arithmetic of one phase of a program with bernoulli groups (what
    `runtime.settle.settle_walk` plugs in): the batch is one unit that runs every time
    step (tol -1: no fixed point is looked for, no cycles); `observe` sums the states of
    the last steps (the phase's mean)."""

    detach = False

    def __init__(self, sim: Simulator, spk: _Spikes, classes: list[list[str]], sign: int,
                 y: torch.Tensor | None, routing: dict | None, mean_from: int):
        self.sim, self.spk, self.sign, self.y = sim, spk, sign, y
        self.names = [g for cls in classes for g in cls]
        self.firsts = {cls[0] for cls in classes[1:]}   # where a class boundary is crossed
        self.route = routing         # given (a nudged phase's pool=free): fixed; else live
        self.mean_from = mean_from
        self.step = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.last: dict = {}

    def drive(self, j: str, S: dict, ver: dict) -> torch.Tensor:
        if j in self.firsts:
            self.spk.publish()
        return self.sim._drive(j, S, self.sign, self.y, self.route, self.spk)

    def delta_buffer(self, n: int):
        return IntSettle.delta_buffer(self, n)

    def observe(self, S: dict, rmax: float) -> None:
        self.spk.publish()
        self.step += 1
        if self.step > self.mean_from:
            for g in self.names:
                self.sums[g] = S[g] + self.sums[g] if g in self.sums else S[g].clone()

    def take_rows(self, take) -> None:      # one unit: the walk never narrows it
        raise AssertionError("a spiking phase's batch settles as one unit")

    def finish(self, units, rows, sizes, S: dict, d, sweeps: int, converged) -> None:
        self.last = dict(S)


# --------------------------------------------------------------------------- resources
def resources(prog: Program) -> dict:
    """Memory bytes by kind and synaptic operations per sweep / inference / learning step.

    Programs with bernoulli groups: a direction that reads spikes costs additions, one per
    spike and synapse it crosses (at most its multiply-accumulate count per time step, when
    every unit fires); the others multiply-accumulates as in a rate program. Their phases
    run exactly their time steps, so the counts per inference are exact, not caps; what
    `epc run` measures (`synaptic_events_per_inference`) is what the spikes cost. A chain
    from a clamped input is applied once per sample there (`multiply_adds_once`): its
    source is constant, and the core holds its term."""
    by_kind: dict[str, int] = {}
    for m in prog.memories:
        by_kind[m.kind] = by_kind.get(m.kind, 0) + m.nbytes
    sim = Simulator(prog)
    per_sweep = adds = once = 0
    held = 0                     # units driven by held input terms (spiking programs)
    for c in sim.chains:
        if c.kind == "teacher":
            continue
        if prog.stochastic and c.src not in sim.groups:
            once += sim.macs[c.name]
            held += int(np.prod(sim._shape(c.dst)))
            continue
        for fb in (False, True) if c.feedback else (False,):
            if sim.spike_read.get((c.name, fb)):
                adds += sim.macs[c.name]
            else:
                per_sweep += sim.macs[c.name]
    learn = sum(int(np.prod(sim.W[w].shape)) * 2 for c in sim.chains if c.name in prog.learn
                for w, _ in c.weights)
    free = prog.phase("free")
    nudge = prog.phase("nudge+")
    out = {"memory_bytes": {**by_kind, "total": sum(by_kind.values())},
           "synops_per_sweep": per_sweep,
           "synops_per_inference_max": once + per_sweep * free.sweeps,
           "synops_per_learning_step_max": once + per_sweep * (free.sweeps + 2 * nudge.sweeps)
           + learn,
           "parameters": sum(m.size for m in prog.memories if m.kind in ("weight", "bias"))}
    if prog.stochastic:
        units = sum(prog.mem(g.mem).size for g in prog.groups if g.neuron == "bernoulli")
        # beside the declared memories, per bernoulli unit its generator (32 bits), trace
        # (F + K + 1 bits) and spike bit; a 32-bit current trace per unit a spike-reading
        # direction drives; a 32-bit sum per settled unit for the phase's mean
        state_bits = held * ACC_BITS
        for g in prog.groups:
            size = prog.mem(g.mem).size
            if g.neuron == "bernoulli":
                state_bits += size * (32 + prog.frac_bits + g.tau_shift + 2)
            if g.role != "teacher":
                state_bits += size * ACC_BITS
        for (name, fb), yes in sim.spike_read.items():
            if yes:
                c = next(x for x in sim.chains if x.name == name)
                state_bits += int(np.prod(sim._shape(c.src if fb else c.dst))) * ACC_BITS
        out.update({"bernoulli_units": units, "multiply_adds_once": once,
                    "time_steps": {"free": free.sweeps, "nudge": nudge.sweeps},
                    "spike_additions_per_step_max": adds,
                    "spike_additions_per_inference_max": adds * free.sweeps,
                    "spiking_state_bytes": (state_bits + 7) // 8})
    return out
