"""Assembly text <-> Program: the readable form of a neuromorphic program.

`disassemble(prog)` prints every declaration and instruction (and, unless elided, every
memory word); `assemble(text)` parses it back to the same Program, so a program survives
text -> binary -> text unchanged. Syntax (one statement per line, `;` starts a comment):

    .epc-nc 1                               header: format version
    .program NAME
    .config frac_bits=8 beta_q=2048 lr_shift=9 seed=0 rng_step=0 [pool_freeze=20]
            [spike_seed=S]                  version 3: the spike generators' seed
    .meta KEY "VALUE"
    .input x
    .mem NAME KIND sBITS|uBITS [d0,d1,...]  KIND: input state weight exp bias
    .data NAME                              the words of a constant memory, row-major ...
      12 -3 7 ...
    .end
    .group NAME mem=M lo=L hi=H act=clip|relu|identity role=R [bias=B]
        [neuron=bernoulli tau_shift=K]      version 3: a spiking group
    .syn NAME SRC -> DST kind=K fb=0|1 learn=0|1
      dense w=W e=E | conv w=W e=E s=1,1 p=0,0,0,0 d=1,1 g=1 | chscale w=W e=E
      maxpool k=2,2 s=2,2 p=0,0,0,0 d=1,1 ceil=0 | sumpool k=2,2 s=2,2 p=0,0,0,0 ceil=0
      rmul=1 rshift=2 | gsum keep=1 rmul=1 rshift=6 | apool o=7,7 rmul=1 rshift=2
      | pad p=0,1,1,0,1,1 | permute d=2,16,64 p=1,0,2 o=32,8,8 | flatten | identity
    .end
    .cost NAME GROUP target=label|TEACHER_GROUP wq=256
    .phase teacher|free|nudge+|nudge- sweeps=N [pool=free] [mean=H [noise=free|own]]
      update G1 G2 ...                      one colour class, updated as a block
    .end
    .learn NAME ...                         synapses and bias memories the learning step updates
"""
from __future__ import annotations

import json
import re

import numpy as np

from epc.compiler import ops as O
from epc.compiler.errors import EpcError

from .isa import (ASM_HEADER, ISA_VERSION, CostSpec, Group, Memory, Phase, Program, SynOp,
                  Synapse, format_version)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.+\-]*$")
WORDS_PER_LINE = 24


def _ints(v) -> str:
    return ",".join(str(int(a)) for a in v)


def _field_text(v, form) -> str:
    if form == "name" or form == "int":
        return str(v)
    if form == "flag":
        return str(int(v))
    return _ints(v)           # n comma-separated integers


def _op_text(op: SynOp) -> str:
    """One chain stage: the instruction and its fields in the order the op registry
    declares them (compiler/ops.py, each rule's `core`)."""
    r = O.core_rule(op.kind)
    fields = r.core.fields if r is not None else ()
    return " ".join([op.kind] + [f"{key}={_field_text(getattr(op, attr), form)}"
                                 for key, attr, form in fields])


def disassemble(prog: Program, *, data: bool = True, elide_over: int | None = None) -> str:
    """The assembly text. data=False omits memory contents (a skeleton: the binary codec
    stores the words separately); elide_over=N replaces data blocks over N words with a
    one-line summary (for `epc inspect`; such text does not assemble)."""
    # the version-2 fields are written only when used, so older programs print unchanged
    out = [f"{ASM_HEADER} {format_version(prog)}", f".program {prog.name}",
           f".config frac_bits={prog.frac_bits} beta_q={prog.beta_q} lr_shift={prog.lr_shift} "
           f"seed={prog.seed} rng_step={prog.rng_step}"
           + (f" pool_freeze={prog.pool_freeze}" if prog.pool_freeze else "")
           + (f" spike_seed={prog.spike_seed}" if prog.spike_seed else "")]
    for k in sorted(prog.meta):
        out.append(f".meta {k} {json.dumps(str(prog.meta[k]))}")
    for name in prog.inputs:
        out.append(f".input {name}")
    out.append("")
    out.append("; ---- memories")
    for m in prog.memories:
        out.append(f".mem {m.name} {m.kind} {m.type_str()} [{_ints(m.shape)}]")
    for m in prog.memories:
        if m.data is None or not data:
            continue
        flat = np.asarray(m.data).reshape(-1)
        if elide_over is not None and flat.size > elide_over:
            out.append(f"; .data {m.name}: {flat.size} words, min {int(flat.min())}, "
                       f"max {int(flat.max())} (elided)")
            continue
        out.append(f".data {m.name}")
        for i in range(0, flat.size, WORDS_PER_LINE):
            out.append("  " + " ".join(str(int(v)) for v in flat[i:i + WORDS_PER_LINE]))
        out.append(".end")
    out.append("")
    out.append("; ---- neuron groups")
    for g in prog.groups:
        line = f".group {g.name} mem={g.mem} lo={g.lo} hi={g.hi} act={g.act} role={g.role}"
        line += f" bias={g.bias}" if g.bias else ""
        if g.neuron != "rate":
            line += f" neuron={g.neuron} tau_shift={g.tau_shift}"
        out.append(line)
    out.append("")
    out.append("; ---- synapses")
    for s in prog.synapses:
        out.append(f".syn {s.name} {s.src} -> {s.dst} kind={s.kind} fb={int(s.feedback)} "
                   f"learn={int(s.learn)}")
        for op in s.ops:
            out.append("  " + _op_text(op))
        out.append(".end")
    out.append("")
    for c in prog.costs:
        out.append(f".cost {c.name} {c.group} target={c.target} wq={c.wq}")
    out.append("")
    out.append("; ---- sequence")
    for ph in prog.phases:
        out.append(f".phase {ph.name} sweeps={ph.sweeps}" + (" pool=free" if ph.hold_pool else "")
                   + (f" mean={ph.mean}" if ph.mean else "")
                   + (f" noise={ph.noise}" if ph.noise else ""))
        for cls in ph.classes:
            out.append("  update " + " ".join(cls))
        out.append(".end")
    out.append(".learn " + " ".join(prog.learn))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- parser
class _Parser:
    def __init__(self, text: str, source: str):
        self.source = source
        self.lines = []
        for i, raw in enumerate(text.splitlines(), 1):
            line = raw.split(";", 1)[0].strip()
            if line:
                self.lines.append((i, line))
        self.pos = 0

    def err(self, lineno: int, msg: str) -> EpcError:
        return EpcError(f"{self.source}:{lineno}: {msg}")

    def kv(self, lineno: int, toks: list[str], what: str) -> dict[str, str]:
        d = {}
        for t in toks:
            if "=" not in t:
                raise self.err(lineno, f"{what}: expected key=value, got {t!r}")
            k, v = t.split("=", 1)
            if k in d:
                raise self.err(lineno, f"{what}: {k} given twice")
            d[k] = v
        return d

    def name(self, lineno: int, t: str, what: str) -> str:
        if not _NAME.match(t):
            raise self.err(lineno, f"{what}: bad name {t!r}")
        return t

    def integer(self, lineno: int, v: str, what: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise self.err(lineno, f"{what}: expected an integer, got {v[:40]!r}")
        if not -2 ** 63 <= n < 2 ** 63:      # (program words and fields are int64)
            raise self.err(lineno, f"{what}: integer {v[:40]} out of range")
        return n

    def intlist(self, lineno: int, v: str, n: int, what: str) -> tuple[int, ...]:
        parts = v.split(",")
        if len(parts) != n:
            raise self.err(lineno, f"{what}: expected {n} comma-separated integers, got {v!r}")
        return tuple(self.integer(lineno, p, what) for p in parts)

    def need(self, lineno: int, d: dict, keys: tuple, what: str, optional: tuple = ()) -> None:
        missing = [k for k in keys if k not in d]
        if missing:
            raise self.err(lineno, f"{what}: missing {missing[0]}=")
        extra = [k for k in d if k not in keys and k not in optional]
        if extra:
            raise self.err(lineno, f"{what}: unknown field {extra[0]}=")

    def v2(self, lineno: int, what: str) -> None:
        if self.version < 2:
            raise self.err(lineno, f"{what} needs program format version 2 (the header says "
                                   f"{self.version})")

    def v3(self, lineno: int, what: str) -> None:
        if self.version < 3:
            raise self.err(lineno, f"{what} needs program format version 3 (the header says "
                                   f"{self.version})")

    def block(self, start: int, what: str) -> list[tuple[int, str]]:
        body = []
        while self.pos < len(self.lines):
            i, line = self.lines[self.pos]
            self.pos += 1
            if line == ".end":
                return body
            if line.startswith("."):
                raise self.err(i, f"{what} (line {start}) not closed by .end before {line.split()[0]}")
            body.append((i, line))
        raise self.err(start, f"{what}: no .end")

    def field(self, i: int, v: str, form, what: str):
        if form == "name":
            return v
        if form == "int":
            return self.integer(i, v, what)
        if form == "flag":
            return bool(self.integer(i, v, what))
        if form == "ints":
            return tuple(self.integer(i, p, what) for p in v.split(","))
        return self.intlist(i, v, form, what)

    def op(self, i: int, line: str, what: str) -> SynOp:
        """One chain stage, its fields as the op registry declares the instruction."""
        toks = line.split()
        k, d = toks[0], self.kv(i, toks[1:], f"{what}: {toks[0]}")
        w = f"{what}: {k}"
        r = O.core_rule(k)
        if r is None:
            raise self.err(i, f"{what}: unknown synapse op {k!r} ({', '.join(O.CORE_RULES)})")
        fields = r.core.fields
        self.need(i, d, tuple(key for key, _, _ in fields), w)
        return SynOp(k, **{attr: self.field(i, d[key], form, w) for key, attr, form in fields})

    def parse(self) -> Program:
        """The program: the header, then each statement by its directive, then the
        .data blocks into their memories."""
        self.header()
        self.prog = p = Program(name="")
        self.datas: dict[str, tuple[int, list[int]]] = {}   # memory -> (line, words)
        directives = {".program": self.d_program, ".config": self.d_config,
                      ".meta": self.d_meta, ".input": self.d_input, ".mem": self.d_mem,
                      ".data": self.d_data, ".group": self.d_group, ".syn": self.d_syn,
                      ".cost": self.d_cost, ".phase": self.d_phase, ".learn": self.d_learn,
                      ".end": self.d_end}
        while self.pos < len(self.lines):
            i, line = self.lines[self.pos]
            self.pos += 1
            toks = line.split()
            handle = directives.get(toks[0])
            if handle is None:
                raise self.err(i, f"unknown directive {toks[0]!r}")
            handle(i, line, toks)
        mems = {m.name: m for m in p.memories}
        for name, (i, vals) in self.datas.items():
            if name not in mems:
                raise self.err(i, f".data {name}: no such memory")
            m = mems[name]
            if len(vals) != m.size:
                raise self.err(i, f".data {name}: {len(vals)} words, memory {m.name} holds "
                                  f"{m.size}")
            m.data = np.asarray(vals, dtype=np.int64).reshape(m.shape)
        if not p.name:
            raise EpcError(f"{self.source}: no .program line")
        return p

    def header(self) -> None:
        if not self.lines:
            raise EpcError(f"{self.source}: empty program")
        i, line = self.lines[0]
        toks = line.split()
        if toks[0] != ASM_HEADER or len(toks) != 2:
            raise self.err(i, f"expected the header '{ASM_HEADER} {ISA_VERSION}'")
        ver = self.integer(i, toks[1], "header")
        if ver > ISA_VERSION:
            raise self.err(i, f"program format version {ver} is newer than this epc reads "
                              f"(up to {ISA_VERSION}); upgrade epc")
        if ver < 1:
            raise self.err(i, f"bad program format version {ver}")
        self.pos = 1
        self.version = ver

    # ---- one method per directive: its line number, the line and its tokens
    def d_program(self, i: int, line: str, toks: list[str]) -> None:
        p = self.prog
        if len(toks) != 2:
            raise self.err(i, ".program: expected one name")
        p.name = self.name(i, toks[1], ".program")

    def d_config(self, i: int, line: str, toks: list[str]) -> None:
        p = self.prog
        d = self.kv(i, toks[1:], ".config")
        self.need(i, d, ("frac_bits", "beta_q", "lr_shift", "seed", "rng_step"), ".config",
                  ("pool_freeze", "spike_seed"))
        if "pool_freeze" in d:
            self.v2(i, ".config pool_freeze=")
            p.pool_freeze = self.integer(i, d["pool_freeze"], ".config")
        if "spike_seed" in d:
            self.v3(i, ".config spike_seed=")
            p.spike_seed = self.integer(i, d["spike_seed"], ".config")
        p.frac_bits = self.integer(i, d["frac_bits"], ".config")
        p.beta_q = self.integer(i, d["beta_q"], ".config")
        p.lr_shift = self.integer(i, d["lr_shift"], ".config")
        p.seed = self.integer(i, d["seed"], ".config")
        p.rng_step = self.integer(i, d["rng_step"], ".config")

    def d_meta(self, i: int, line: str, toks: list[str]) -> None:
        p = self.prog
        parts = line.split(None, 2)
        if len(parts) != 3:
            raise self.err(i, ".meta: expected KEY \"VALUE\"")
        try:
            v = json.loads(parts[2])
        except json.JSONDecodeError:
            raise self.err(i, f".meta {parts[1]}: value must be a quoted string")
        if not isinstance(v, str):
            raise self.err(i, f".meta {parts[1]}: value must be a quoted string")
        p.meta[parts[1]] = v

    def d_input(self, i: int, line: str, toks: list[str]) -> None:
        p = self.prog
        if len(toks) != 2:
            raise self.err(i, ".input: expected one memory name")
        p.inputs.append(self.name(i, toks[1], ".input"))

    def d_mem(self, i: int, line: str, toks: list[str]) -> None:
        p = self.prog
        if len(toks) != 5:
            raise self.err(i, ".mem: expected NAME KIND TYPE [SHAPE]")
        name = self.name(i, toks[1], ".mem")
        w = f".mem {name}"
        m = re.fullmatch(r"([su])(\d+)", toks[3])
        if not m:
            raise self.err(i, f"{w}: bad type {toks[3]!r} (s8, u8, s16, ...)")
        sm = re.fullmatch(r"\[([0-9,]*)\]", toks[4])
        if not sm:
            raise self.err(i, f"{w}: bad shape {toks[4]!r} (e.g. [256,64])")
        shape = tuple(self.integer(i, v, w) for v in sm.group(1).split(",") if v)
        p.memories.append(Memory(name, toks[2], m.group(1) == "s", int(m.group(2)), shape))

    def d_data(self, i: int, line: str, toks: list[str]) -> None:
        if len(toks) != 2:
            raise self.err(i, ".data: expected one memory name")
        name = toks[1]
        body = self.block(i, f".data {name}")
        vals = []
        for j, l in body:
            vals.extend(self.integer(j, v, f".data {name}") for v in l.split())
        if name in self.datas:
            raise self.err(i, f".data {name}: given twice")
        self.datas[name] = (i, vals)

    def d_group(self, i: int, line: str, toks: list[str]) -> None:
        p = self.prog
        if len(toks) < 2:
            raise self.err(i, ".group: expected a name")
        name = self.name(i, toks[1], ".group")
        w = f".group {name}"
        d = self.kv(i, toks[2:], w)
        self.need(i, d, ("mem", "lo", "hi", "act", "role"), w, ("bias", "neuron", "tau_shift"))
        g = Group(name, d["mem"], self.integer(i, d["lo"], w), self.integer(i, d["hi"], w),
                  d["role"], d.get("bias"), d["act"])
        if "neuron" in d or "tau_shift" in d:
            self.v3(i, f"{w} neuron=")
            if "neuron" not in d or "tau_shift" not in d:
                raise self.err(i, f"{w}: neuron= and tau_shift= go together")
            g.neuron, g.tau_shift = d["neuron"], self.integer(i, d["tau_shift"], w)
        p.groups.append(g)

    def d_syn(self, i: int, line: str, toks: list[str]) -> None:
        p = self.prog
        if len(toks) < 5 or toks[3] != "->":
            raise self.err(i, ".syn: expected NAME SRC -> DST kind=.. fb=.. learn=..")
        name = self.name(i, toks[1], ".syn")
        w = f".syn {name}"
        d = self.kv(i, toks[5:], w)
        self.need(i, d, ("kind", "fb", "learn"), w)
        body = self.block(i, w)
        ops = [self.op(j, l, w) for j, l in body]
        p.synapses.append(Synapse(name, toks[2], toks[4], ops, d["kind"],
                                  bool(self.integer(i, d["fb"], w)),
                                  bool(self.integer(i, d["learn"], w))))

    def d_cost(self, i: int, line: str, toks: list[str]) -> None:
        p = self.prog
        if len(toks) < 3:
            raise self.err(i, ".cost: expected NAME GROUP target=.. wq=..")
        w = f".cost {toks[1]}"
        d = self.kv(i, toks[3:], w)
        self.need(i, d, ("target", "wq"), w)
        p.costs.append(CostSpec(self.name(i, toks[1], ".cost"), toks[2], d["target"],
                                self.integer(i, d["wq"], w)))

    def d_phase(self, i: int, line: str, toks: list[str]) -> None:
        p = self.prog
        if not 3 <= len(toks) <= 6:
            raise self.err(i, ".phase: expected NAME sweeps=N [pool=free|live] [mean=H "
                              "[noise=free|own]]")
        w = f".phase {toks[1]}"
        d = self.kv(i, toks[2:], w)
        self.need(i, d, ("sweeps",), w, ("pool", "mean", "noise"))
        if "mean" in d or "noise" in d:
            self.v3(i, f"{w} mean=")
        if d.get("pool", "live") not in ("free", "live"):
            raise self.err(i, f"{w}: pool={d['pool']} (supported: free, live)")
        if "pool" in d:
            self.v2(i, f"{w} pool=")
        classes = []
        for j, l in self.block(i, w):
            t = l.split()
            if t[0] != "update" or len(t) < 2:
                raise self.err(j, f"{w}: expected 'update GROUP ...', got {l!r}")
            classes.append(t[1:])
        ph = Phase(toks[1], self.integer(i, d["sweeps"], w), classes, d.get("pool") == "free")
        if "mean" in d:
            ph.mean = self.integer(i, d["mean"], w)
        if "noise" in d:
            ph.noise = d["noise"]
        p.phases.append(ph)

    def d_learn(self, i: int, line: str, toks: list[str]) -> None:
        p = self.prog
        p.learn = toks[1:]

    def d_end(self, i: int, line: str, toks: list[str]) -> None:
        raise self.err(i, ".end without an open block")


def assemble(text: str, source: str = "<asm>") -> Program:
    """Parse assembly text into a Program (not validated: see validate.py)."""
    return _Parser(text, source).parse()
