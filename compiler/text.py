"""The textual IR: a printer and a parser whose round trip is exact.

    epc-ir 1
    graph mlp_digits {
      attr source = "examples/mlp_digits.onnx"
      input x : [64]
      weight fc1.weight : f32[256, 64]
      node fc1 = dense(x) [weight=@fc1.weight] : [256]          # feedforward form
      output fc2
      state h1 : [256] [act=clip(lo=0.0, hi=1.0), source_act=relu(), neuron=rate, role=hidden, bias=@h1.bias]
      coupling c1 : x -> h1 [kind=forward, feedback=false] {
        dense [weight=@fc1.weight]
      }
      cost label : out [kind=ce, target=label, weight=1.0, temperature=1.0]
      teacher t [source="source", output=t.out, temperature=4.0, mix=0.5]
      schedule [mode=colour, max_sweeps=100, nudge_sweeps=40, tol=0.0001] {
        [h1, out]
      }
    }

A graph with bernoulli states writes the schedule's spiking part after `tol` (ir.Spiking):
`time_steps=64, nudge_time_steps=32, averaging=trace, tau=8, sampling=shared`.

Attribute values: integers, floats (Python repr, so they round-trip), true/false, strings
in double quotes, bare names, weight references @name, lists [a, b] and activation calls
kind(field=value, ...). `#` starts a comment.

A weight is declared by dtype and shape; its data usually lives beside the text (in the
bundle). The text can also carry it, so that a small graph is a self-contained file (a pass
test, an `epc opt` input):

    weight fc1.weight : f32[3, 2] = seeded(7)                    # drawn from a seed
    weight bn.var : f32[3] = seeded(8, lo=0.5, hi=1.5)           # uniform in [lo, hi)
    weight fc1.bias : f32[3] = [0.5, -1.0, 0.25]                 # a literal tensor

`seeded` is defined by ir.Seeded (uniform in +-1/sqrt(fan_in) unless lo/hi are given). A
literal is nested lists matching the shape (lines may break inside its brackets); float32
values are printed with the fewest digits that read back to the same float32.

`print_graph(g, weights=...)` chooses how weights are written:
  'shapes'  declarations only (the bundle's graph.ir, which any version-1 reader reads);
  'seeded'  (default) declarations, plus `= seeded(...)` for weights the text gave that way
            whose data is still exactly what the recipe makes;
  'inline'  as 'seeded', and every other weight holding data as a literal: the text then
            carries all the data (exact: parse gives back the same arrays).
`print_graph(parse(text), weights=m) == text` for any text printed with mode m.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import numpy as np

from .errors import IRSyntaxError
from .limits import check_memory, numel
from .ir import (AVERAGINGS, FORMAT_VERSION, OP_TYPES, SAMPLINGS, Activation, Act, Coupling,
                 Cost, Graph, Input, Node, Schedule, Seeded, Spiking, State, Teacher,
                 WeightSpec)

HEADER = "epc-ir"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_INT_RE = re.compile(r"[-+]?\d+")
MAX_RANK = 32          # dimensions of a shape (numpy's own limit is 64)
MAX_NESTING = 16       # brackets inside an attribute value
MAX_ELEMENTS = 1 << 40  # elements of one declared shape
MAX_SWEEPS = 1_000_000  # a schedule's sweep caps (as the --max-sweeps flag allows)
# a bernoulli graph's schedule: its spiking part (ir.Spiking), all or none of these
SPIKING_KEYS = ("time_steps", "nudge_time_steps", "averaging", "tau", "sampling")


# =========================================================================== printer
def _name(s: str) -> str:
    if not _NAME_RE.match(s):
        raise ValueError(f"IR name {s!r} is not an identifier")
    return s


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Activation):
        return v.kind + "(" + ", ".join(f"{k}={_value(x)}" for k, x in v.fields().items()) + ")"
    raise TypeError(f"cannot print attribute value {v!r}")


class _Ref(str):
    """A weight reference (printed @name)."""


class _Bare(str):
    """A bare identifier value (printed without quotes)."""


def _attr(v: Any) -> str:
    if isinstance(v, _Ref):
        return "@" + v
    if isinstance(v, _Bare):
        return str(v)
    return _value(v)


def _attrs(pairs: list[tuple[str, Any]]) -> str:
    return "[" + ", ".join(f"{k}={_attr(v)}" for k, v in pairs) + "]"


_WEIGHT_FIELDS = ("weight", "scale", "shift", "mean", "var")


def _op_pairs(op) -> list[tuple[str, Any]]:
    pairs = []
    for f in dataclasses.fields(op):
        v = getattr(op, f.name)
        pairs.append((f.name, _Ref(v) if f.name in _WEIGHT_FIELDS else v))
    return pairs


def _shape(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


# the IR's dtype names and their numpy types (the dtypes a weight can be written in)
DTYPES = {"f32": np.float32, "f64": np.float64, "i64": np.int64, "i32": np.int32,
          "i16": np.int16, "i8": np.int8, "u8": np.uint8}
_DTYPE_NAMES = {np.dtype(t).name: k for k, t in DTYPES.items()}
WEIGHT_MODES = ("shapes", "seeded", "inline")


def _dtype(w) -> str:
    if isinstance(w, WeightSpec):
        return w.dtype
    return _DTYPE_NAMES.get(str(w.dtype), str(w.dtype))


def _seeded(r: Seeded) -> str:
    if r.lo is None:
        return f"seeded({r.seed})"
    return f"seeded({r.seed}, lo={_value(float(r.lo))}, hi={_value(float(r.hi))})"


def _number(x, dtype: np.dtype) -> str:
    if dtype == np.float32:
        # numpy's shortest float32 digits; a string that would not read back to the same
        # float32 through a float64 (a double rounding) is written as the exact float64
        s = str(np.float32(x))
        return s if np.float32(float(s)) == np.float32(x) else repr(float(x))
    if np.issubdtype(dtype, np.floating):
        return repr(float(x))
    return str(int(x))


def _literal(arr: np.ndarray) -> str:
    dt = arr.dtype

    def rec(a) -> str:
        if a.ndim == 0:
            return _number(a[()], dt)
        return "[" + ", ".join(rec(x) for x in a) + "]"
    return rec(np.asarray(arr))


def _weight_data(g: Graph, name: str, w, mode: str) -> str:
    """' = ...' after a weight declaration, or '' (see the module docstring's modes)."""
    if mode == "shapes" or isinstance(w, WeightSpec):
        return ""
    recipe = g.seeds.get(name)
    if recipe is not None and np.array_equal(recipe.make(w.shape, w.dtype), w):
        return " = " + _seeded(recipe)
    if mode == "inline":
        if _dtype(w) not in DTYPES:
            raise ValueError(f"weight {name}: dtype {w.dtype} cannot be written in the IR")
        return " = " + _literal(w)
    return ""


def print_graph(g: Graph, *, weights: str = "seeded") -> str:
    """The graph as IR text; `weights` says how weight data is written ('shapes', 'seeded'
    or 'inline': see the module docstring)."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights={weights!r}: use one of {', '.join(WEIGHT_MODES)}")
    out = [f"{HEADER} {FORMAT_VERSION}", f"graph {_name(g.name)} {{"]
    for k, v in g.attrs.items():
        out.append(f"  attr {_name(k)} = {_value(v)}")
    for i in g.inputs:
        out.append(f"  input {_name(i.name)} : {_shape(i.shape)}")
    for name in sorted(g.weights):
        w = g.weights[name]
        out.append(f"  weight {_name(name)} : {_dtype(w)}{_shape(w.shape)}"
                   + _weight_data(g, name, w, weights))
    for n in g.nodes:
        args = ", ".join(_name(x) for x in n.inputs)
        pairs = _op_pairs(n.op)
        attrs = " " + _attrs(pairs) if pairs else ""
        out.append(f"  node {_name(n.name)} = {n.op.kind}({args}){attrs} : {_shape(n.shape)}")
    for o in g.outputs:
        out.append(f"  output {_name(o)}")
    for s in g.states:
        pairs = [("act", s.act), ("source_act", s.source_act), ("neuron", _Bare(s.neuron)),
                 ("role", _Bare(s.role))]
        if s.bias:
            pairs.append(("bias", _Ref(s.bias)))
        if s.readout:       # printed only when set: dumps of other graphs are unchanged
            pairs.append(("readout", True))
        out.append(f"  state {_name(s.name)} : {_shape(s.shape)} {_attrs(pairs)}")
    for c in g.couplings:
        pairs = [('kind', _Bare(c.kind)), ('feedback', c.feedback)]
        if c.feedback_gain != 1.0:   # printed only when set: other dumps are unchanged
            pairs.append(('feedback_gain', float(c.feedback_gain)))
        out.append(f"  coupling {_name(c.name)} : {_name(c.src)} -> {_name(c.dst)} "
                   f"{_attrs(pairs)} {{")
        for op in c.ops:
            pairs = _op_pairs(op)
            out.append(f"    {op.kind}" + (f" {_attrs(pairs)}" if pairs else ""))
        out.append("  }")
    for c in g.costs:
        out.append(f"  cost {_name(c.name)} : {_name(c.state)} "
                   + _attrs([("kind", _Bare(c.kind)), ("target", _Bare(c.target)),
                             ("weight", float(c.weight)), ("temperature", float(c.temperature))]))
    if g.teacher:
        t = g.teacher
        out.append(f"  teacher {_name(t.name)} "
                   + _attrs([("source", t.source), ("output", _Bare(t.output)),
                             ("temperature", float(t.temperature)), ("mix", float(t.mix))]))
    if g.schedule:
        s = g.schedule
        pairs = [("mode", _Bare(s.mode)), ("max_sweeps", s.max_sweeps),
                 ("nudge_sweeps", s.nudge_sweeps), ("tol", float(s.tol))]
        if s.spiking is not None:     # printed only for bernoulli graphs: others unchanged
            sp = s.spiking
            pairs += [("time_steps", sp.time_steps), ("nudge_time_steps", sp.nudge_time_steps),
                      ("averaging", _Bare(sp.averaging)), ("tau", sp.tau),
                      ("sampling", _Bare(sp.sampling))]
        out.append("  schedule " + _attrs(pairs) + " {")
        for cls in s.classes:
            out.append("    [" + ", ".join(_name(x) for x in cls) + "]")
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


# =========================================================================== parser
def _ints(n: int, lo: int):
    return lambda v: (isinstance(v, list) and len(v) == n and all(
        isinstance(x, int) and not isinstance(x, bool) and lo <= x <= 1 << 20 for x in v))


def _int_list(lo: int, hi: int, most: int = 0):
    """1 to `most` (MAX_RANK by default) integers in [lo, hi]."""
    return lambda v: (isinstance(v, list) and 1 <= len(v) <= (most or MAX_RANK) and all(
        isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in v))


# what each op attribute holds (ir.py's dataclass fields), checked as the text is read
_OP_FIELDS = {
    **{k: (lambda v: isinstance(v, _Ref), "a weight reference @name") for k in _WEIGHT_FIELDS},
    "stride": (_ints(2, 1), "two integers >= 1"),
    "dilation": (_ints(2, 1), "two integers >= 1"),
    "kernel": (_ints(2, 1), "two integers >= 1"),
    "pads": (_ints(4, 0), "four integers >= 0"),
    "groups": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 20,
               "an integer >= 1"),
    **{k: (lambda v: isinstance(v, bool), "true or false")
       for k in ("ceil_mode", "count_include_pad", "keepdims", "log")},
    "epsilon": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "fn": (lambda v: isinstance(v, Activation), "an activation such as relu()"),
    # permute, adaptiveavgpool, concat (their meaning together is the op's shape rule's)
    "dims": (_int_list(1, 1 << 40), f"1 to {MAX_RANK} integers >= 1"),
    "shape": (_int_list(1, 1 << 40), f"1 to {MAX_RANK} integers >= 1"),
    "perm": (lambda v: _int_list(0, MAX_RANK)(v) and sorted(v) == list(range(len(v))),
             "a permutation of 0 .. n-1"),
    "out": (_ints(2, 1), "two integers >= 1"),
    "axis": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_RANK,
             f"an integer in [0, {MAX_RANK - 1}]"),
}
# an attribute whose rule depends on the op: a pad's pads crop too (negative) and have
# two entries per axis of any rank
_OP_KIND_FIELDS = {
    ("pad", "pads"): (lambda v: _int_list(-(1 << 20), 1 << 20, 2 * MAX_RANK)(v)
                      and len(v) % 2 == 0, f"an even number (2 to {2 * MAX_RANK}) of "
                                           f"integers in [-2^20, 2^20]"),
}


_TOKEN_RE = re.compile(r"""
    (?P<ws>[ \t]+)
  | (?P<comment>\#[^\n]*)
  | (?P<nl>\n)
  | (?P<header>epc-ir\b)
  | (?P<arrow>->)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|[-+]?inf\b|nan\b)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[\[\](){}=,:@])
""", re.VERBOSE)


class _Tok:
    __slots__ = ("kind", "text", "line", "col")

    def __init__(self, kind, text, line, col):
        self.kind, self.text, self.line, self.col = kind, text, line, col


class _Parser:
    def __init__(self, text: str, source: str):
        self.source = source
        self.toks: list[_Tok] = []
        line, col, pos = 1, 1, 0
        while pos < len(text):
            m = _TOKEN_RE.match(text, pos)
            if not m:
                raise IRSyntaxError(f"unexpected character {text[pos]!r}", source=source,
                                    line=line, col=col)
            kind, tok = m.lastgroup, m.group()
            if kind == "name" and tok in ("inf", "nan"):
                kind = "number"
            if kind not in ("ws", "comment"):
                self.toks.append(_Tok(kind, tok, line, col))
            if kind == "nl":
                line, col = line + 1, 1
            else:
                col += len(tok)
            pos = m.end()
        self.toks.append(_Tok("eof", "", line, col))
        self.i = 0
        self.seeded_bytes = 0

    # ---- token helpers
    def peek(self) -> _Tok:
        return self.toks[self.i]

    def error(self, msg: str, tok: _Tok | None = None):
        tok = tok or self.peek()
        shown = "end of file" if tok.kind == "eof" else ("end of line" if tok.kind == "nl"
                                                         else repr(tok.text))
        raise IRSyntaxError(f"{msg}, found {shown}", source=self.source, line=tok.line,
                            col=tok.col)

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect(self, text: str) -> _Tok:
        t = self.peek()
        if t.text != text or t.kind == "string":
            self.error(f"expected {text!r}")
        return self.next()

    def accept(self, text: str) -> bool:
        t = self.peek()
        if t.text == text and t.kind != "string":
            self.i += 1
            return True
        return False

    def name(self, what: str = "a name") -> str:
        t = self.peek()
        if t.kind != "name":
            self.error(f"expected {what}")
        return self.next().text

    def int_(self) -> int:
        t = self.peek()
        if t.kind != "number" or not _INT_RE.fullmatch(t.text):
            self.error("expected an integer")
        return self.integer(self.next())

    def integer(self, t: _Tok) -> int:
        """An integer token's value; the IR's integers fit 64 bits (and a token of
        thousands of digits is refused before Python converts it)."""
        if len(t.text.lstrip("+-").lstrip("0")) > 19 or not -2 ** 63 <= int(t.text) < 2 ** 63:
            self.error("integer out of range (the IR's integers fit 64 bits)", t)
        return int(t.text)

    def skip_nl(self):
        while self.peek().kind == "nl":
            self.i += 1

    def end_line(self):
        if self.peek().kind not in ("nl", "eof"):
            self.error("expected end of line")
        self.skip_nl()

    # ---- values
    def value(self, depth: int = 0) -> Any:
        t = self.peek()
        if t.kind == "number":
            self.next()
            if _INT_RE.fullmatch(t.text):
                return self.integer(t)
            return float(t.text)
        if t.kind == "string":
            self.next()
            return self.string(t)
        if t.text == "@":
            self.next()
            return _Ref(self.name("a weight name after @"))
        if t.text == "[":
            if depth >= MAX_NESTING:
                self.error(f"lists nested deeper than {MAX_NESTING}")
            self.next()
            items = []
            if not self.accept("]"):
                items.append(self.value(depth + 1))
                while self.accept(","):
                    items.append(self.value(depth + 1))
                self.expect("]")
            return items
        if t.kind == "name":
            self.next()
            if t.text in ("true", "false"):
                return t.text == "true"
            if self.peek().text == "(":
                return self.activation(t)
            return _Bare(t.text)
        self.error("expected a value")

    def string(self, t: _Tok) -> str:
        """A double-quoted string with JSON escapes; one that would not encode as UTF-8
        (a lone surrogate escape) is refused here rather than when it is written."""
        try:
            v = json.loads(t.text)
            v.encode("utf-8")
        except (ValueError, UnicodeEncodeError) as e:
            self.error(f"bad string ({str(e).splitlines()[0]})", t)
        return v

    def number(self, what: str) -> float:
        """A finite real number (an int or float token)."""
        t = self.peek()
        v = self.value() if t.kind == "number" else None
        if v is None or isinstance(v, bool) or not math.isfinite(v):
            self.error(f"{what} must be a finite number", t)
        return float(v)

    def activation(self, head: _Tok) -> Activation:
        if head.text not in Activation.KINDS:
            self.error(f"unknown activation (supported: {', '.join(Activation.KINDS)})", head)
        want = tuple(Activation(head.text).fields())
        self.expect("(")
        kw = {}
        if not self.accept(")"):
            while True:
                kt = self.peek()
                k = self.name("an activation field")
                if k not in want or k in kw:
                    self.error(f"{head.text}() takes {', '.join(want) or 'no fields'}, each "
                               f"once", kt)
                self.expect("=")
                kw[k] = self.number(f"{head.text}() field {k}")
                if self.accept(")"):
                    break
                self.expect(",")
        if len(kw) != len(want):
            self.error(f"{head.text}() needs {', '.join(f'{k}=' for k in want)}", head)
        if head.text == "clip" and not kw["lo"] < kw["hi"]:
            self.error("clip() needs lo < hi", head)
        return Activation(head.text, **kw)

    def attrs(self, allowed: tuple[str, ...] | None = None) -> dict[str, tuple[Any, _Tok]]:
        """`[key=value, ...]`: each key once, and (when `allowed` is given) one of those:
        an attribute the reader does not know is refused, never ignored."""
        self.expect("[")
        out: dict[str, tuple[Any, _Tok]] = {}
        if self.accept("]"):
            return out
        while True:
            t = self.peek()
            k = self.name("an attribute name")
            if k in out:
                self.error(f"attribute {k!r} given twice", t)
            if allowed is not None and k not in allowed:
                self.error(f"unknown attribute {k!r} (expected {', '.join(allowed)})", t)
            self.expect("=")
            out[k] = (self.value(), t)
            if self.accept("]"):
                return out
            self.expect(",")

    def shape(self, least: int = 1) -> tuple[int, ...]:
        """`[d0, d1, ...]`: dimensions >= `least` (a weight may have a 0 dimension, an
        input, node or state not)."""
        t0 = self.expect("[")
        dims = []
        if not self.accept("]"):
            while True:
                t = self.peek()
                d = self.int_()
                if d < least:
                    self.error(f"a dimension is an integer >= {least}", t)
                dims.append(d)
                if len(dims) > MAX_RANK:
                    self.error(f"a shape has at most {MAX_RANK} dimensions", t)
                if not self.accept(","):
                    break
            self.expect("]")
        if numel(dims) > MAX_ELEMENTS:
            self.error(f"shape {dims} has more than 2^40 elements", t0)
        return tuple(dims)

    # ---- entities
    def op(self, kind_tok: _Tok, attrs: dict[str, tuple[Any, _Tok]]):
        cls = OP_TYPES.get(kind_tok.text)
        if cls is None:
            self.error(f"unknown op (supported: {', '.join(sorted(OP_TYPES))})", kind_tok)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kw = {}
        for k, (v, t) in attrs.items():
            if k not in fields:
                self.error(f"op {kind_tok.text} has no attribute {k!r}", t)
            kind, why = _OP_KIND_FIELDS.get((kind_tok.text, k)) or _OP_FIELDS[k]
            if not kind(v):
                self.error(f"op {kind_tok.text}: attribute {k!r} must be {why}", t)
            kw[k] = str(v) if isinstance(v, _Ref) else v
        missing = [k for k, f in fields.items() if k not in kw
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            self.error(f"op {kind_tok.text} needs attribute {missing[0]!r}", kind_tok)
        return cls(**kw)

    def typed(self, attrs, key, kinds, tok, default=None):
        if key not in attrs:
            if default is not None:
                return default
            self.error(f"missing attribute {key!r}", tok)
        v, t = attrs[key]
        kinds_ = kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds_) \
                or (isinstance(v, _Ref) and str in kinds_):
            self.error(f"attribute {key!r} has the wrong type", t)
        return v

    def real(self, attrs, key, tok, ok, what: str) -> float:
        """A numeric attribute that must be finite and satisfy `ok`."""
        v = float(self.typed(attrs, key, (int, float), tok))
        if not (math.isfinite(v) and ok(v)):
            self.error(f"attribute {key!r} must be {what}", attrs[key][1])
        return v

    def once(self, what: str, taken: bool, t: _Tok) -> None:
        if taken:
            self.error(f"{what} given twice", t)

    def spiking(self, a: dict, t: _Tok) -> Spiking | None:
        """The schedule's spiking part (bernoulli graphs): all five attributes or none."""
        given = [k for k in SPIKING_KEYS if k in a]
        if not given:
            return None
        missing = [k for k in SPIKING_KEYS if k not in a]
        if missing:
            self.error(f"schedule: {given[0]!r} needs the other spiking attributes; missing "
                       f"{', '.join(repr(k) for k in missing)}", a[given[0]][1])
        steps = {}
        for k in ("time_steps", "nudge_time_steps", "tau"):
            steps[k] = self.typed(a, k, int, t)
            if not 1 <= steps[k] <= MAX_SWEEPS:
                self.error(f"attribute {k!r} must be an integer in [1, {MAX_SWEEPS}]", a[k][1])
        names = {}
        for k, allowed in (("averaging", AVERAGINGS), ("sampling", SAMPLINGS)):
            names[k] = self.typed(a, k, str, t)
            if names[k] not in allowed:
                self.error(f"attribute {k!r} must be {' or '.join(allowed)}", a[k][1])
        return Spiking(**steps, **names)

    def graph(self) -> Graph:
        self.skip_nl()
        t = self.peek()
        if t.text != HEADER:
            self.error(f"expected the header '{HEADER} {FORMAT_VERSION}'")
        self.next()
        vt = self.peek()
        version = self.int_()
        if version < 1:
            self.error("expected the format version, an integer >= 1", vt)
        if version > FORMAT_VERSION:
            raise IRSyntaxError(f"IR format version {version} is newer than this epc reads "
                                f"(up to {FORMAT_VERSION}); upgrade epc",
                                source=self.source, line=vt.line, col=vt.col)
        self.end_line()
        self.expect("graph")
        g = Graph(name=self.name("a graph name"))
        self.expect("{")
        self.end_line()
        while True:
            t = self.peek()
            if t.text == "}":
                self.next()
                break
            if t.kind == "eof":
                self.error("expected '}' closing the graph")
            kw = self.name("an entity keyword")
            handler = getattr(self, "ent_" + kw, None)
            if handler is None:
                self.error("expected one of attr, input, weight, node, output, state, coupling, "
                           "cost, teacher, schedule", t)
            handler(g, t)
            self.end_line()
        self.skip_nl()
        if self.peek().kind != "eof":
            self.error("expected end of file after the graph")
        return g

    def ent_attr(self, g, t):
        kt = self.peek()
        k = self.name()
        self.once(f"graph attribute {k!r}", k in g.attrs, kt)
        self.expect("=")
        vt = self.peek()
        v = self.value()
        if not isinstance(v, str) or isinstance(v, (_Ref, _Bare)):
            self.error("graph attributes are strings", vt)
        g.attrs[k] = str(v)

    def ent_input(self, g, t):
        n = self.name()
        self.expect(":")
        g.inputs.append(Input(n, self.shape()))

    def ent_weight(self, g, t):
        nt = self.peek()
        n = self.name()
        self.once(f"weight {n}", n in g.weights, nt)
        self.expect(":")
        dt_tok = self.peek()
        dt = self.name("a dtype such as f32")
        if dt not in DTYPES:
            self.error(f"unknown dtype {dt!r} (supported: {', '.join(DTYPES)})", dt_tok)
        shape = self.shape(least=0)
        if not self.accept("="):
            g.weights[n] = WeightSpec(shape, dt)
            return
        dtype = np.dtype(DTYPES[dt])
        vt = self.peek()
        if vt.kind == "name" and vt.text == "seeded":
            recipe = self.seeded()
            if not np.issubdtype(dtype, np.floating):
                self.error(f"seeded weights are floating point, not {dt}", vt)
            # the recipe is a few bytes of text for any size: what it makes is counted
            self.seeded_bytes += numel(shape) * (8 + dtype.itemsize)   # drawn in float64
            check_memory(self.seeded_bytes, "making its seeded(...) weights", self.source)
            g.weights[n] = recipe.make(shape, dtype)
            g.seeds[n] = recipe
            return
        g.weights[n] = self.literal(n, shape, dtype, vt)

    def seeded(self) -> Seeded:
        """seeded(SEED) or seeded(SEED, lo=X, hi=Y)."""
        head = self.next()
        self.expect("(")
        st = self.peek()
        seed = self.int_()
        if not 0 <= seed < 2 ** 32:
            self.error("a seed is an integer in [0, 2**32)", st)
        bounds = {}
        while self.accept(","):
            kt = self.peek()
            k = self.name("lo or hi")
            if k not in ("lo", "hi") or k in bounds:
                self.error("seeded takes lo= and hi= once each", kt)
            self.expect("=")
            vt = self.peek()
            v = self.value()
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                self.error(f"{k} must be a finite number", vt)
            bounds[k] = float(v)
        self.expect(")")
        if len(bounds) == 1:
            self.error("seeded needs both lo= and hi=, or neither", head)
        if bounds and not bounds["lo"] < bounds["hi"]:
            self.error("seeded needs lo < hi", head)
        return Seeded(seed, bounds.get("lo"), bounds.get("hi"))

    def literal(self, name: str, shape: tuple[int, ...], dtype: np.dtype, at: _Tok) -> np.ndarray:
        """Nested lists of numbers matching `shape` (newlines allowed inside brackets)."""
        integer = not np.issubdtype(dtype, np.floating)

        def number():
            t = self.peek()
            if t.kind != "number" or (integer and not _INT_RE.fullmatch(t.text)):
                self.error(f"weight {name}: expected {'an integer' if integer else 'a number'}")
            self.next()
            return self.integer(t) if _INT_RE.fullmatch(t.text) else float(t.text)

        def rec(depth: int):
            if depth == len(shape):
                return number()
            self.expect("[")
            items = []
            self.skip_nl()
            if not self.accept("]"):
                while True:
                    items.append(rec(depth + 1))
                    self.skip_nl()
                    if self.accept("]"):
                        break
                    self.expect(",")
                    self.skip_nl()
            if len(items) != shape[depth]:
                self.error(f"weight {name}: {len(items)} entries at depth {depth}, its shape "
                           f"{list(shape)} says {shape[depth]}", at)
            return items
        data = rec(0)
        if integer:
            info = np.iinfo(dtype)
            if not all(info.min <= v <= info.max for v in np.array(data, object).reshape(-1)):
                self.error(f"weight {name}: a value does not fit {dtype.name}", at)
            out = np.array(data, dtype=dtype)
        else:
            with np.errstate(all="ignore"):     # (a value beyond float32 becomes inf,
                out = np.array(data, dtype=np.float64).astype(dtype)   # which verify refuses)
        return np.array(out.reshape(shape), order="C")  # ascontiguousarray makes 0-d 1-d

    def ent_node(self, g, t):
        n = self.name()
        self.expect("=")
        kt = self.peek()
        self.name("an op kind")
        self.expect("(")
        ins = []
        if not self.accept(")"):
            ins.append(self.name())
            while self.accept(","):
                ins.append(self.name())
            self.expect(")")
        attrs = self.attrs() if self.peek().text == "[" else {}
        op = self.op(kt, attrs)
        self.expect(":")
        g.nodes.append(Node(n, op, ins, self.shape()))

    def ent_output(self, g, t):
        g.outputs.append(self.name())

    def ent_state(self, g, t):
        n = self.name()
        self.expect(":")
        shape = self.shape()
        a = self.attrs(("act", "source_act", "neuron", "role", "bias", "readout"))
        bias = a.get("bias")
        if bias is not None and not isinstance(bias[0], _Ref):
            self.error("bias must be a weight reference @name", bias[1])
        g.states.append(State(
            n, shape,
            act=self.typed(a, "act", Activation, t),
            source_act=self.typed(a, "source_act", Activation, t),
            neuron=str(self.typed(a, "neuron", str, t)),
            role=str(self.typed(a, "role", str, t)),
            bias=str(bias[0]) if bias else None,
            readout=self.typed(a, "readout", bool, t, default=False)))

    def ent_coupling(self, g, t):
        n = self.name()
        self.expect(":")
        src = self.name()
        self.expect("->")
        dst = self.name()
        a = self.attrs(("kind", "feedback", "feedback_gain"))
        gain = float(self.typed(a, "feedback_gain", (int, float), t, default=1.0))
        if not (math.isfinite(gain) and gain > 0):
            self.error(f"feedback_gain {gain} of coupling {n!r} is not a positive number",
                       a["feedback_gain"][1])
        c = Coupling(n, src, dst, [], kind=str(self.typed(a, "kind", str, t)),
                     feedback=self.typed(a, "feedback", bool, t), feedback_gain=gain)
        self.expect("{")
        self.end_line()
        while not self.accept("}"):
            kt = self.peek()
            self.name("an op kind or '}'")
            attrs = self.attrs() if self.peek().text == "[" else {}
            c.ops.append(self.op(kt, attrs))
            self.end_line()
        g.couplings.append(c)

    def ent_cost(self, g, t):
        n = self.name()
        self.expect(":")
        st = self.name()
        a = self.attrs(("kind", "target", "weight", "temperature"))
        g.costs.append(Cost(n, st, kind=str(self.typed(a, "kind", str, t)),
                            target=str(self.typed(a, "target", str, t)),
                            weight=self.real(a, "weight", t, lambda v: v >= 0,
                                             "a finite number >= 0"),
                            temperature=self.real(a, "temperature", t, lambda v: v > 0,
                                                  "a finite number > 0")))

    def ent_teacher(self, g, t):
        self.once("teacher", g.teacher is not None, t)
        n = self.name()
        a = self.attrs(("source", "output", "temperature", "mix"))
        g.teacher = Teacher(n, source=str(self.typed(a, "source", str, t)),
                            output=str(self.typed(a, "output", str, t)),
                            temperature=self.real(a, "temperature", t, lambda v: v > 0,
                                                  "a finite number > 0"),
                            mix=self.real(a, "mix", t, lambda v: 0 <= v <= 1,
                                          "a number in [0, 1]"))

    def ent_schedule(self, g, t):
        self.once("schedule", g.schedule is not None, t)
        a = self.attrs(("mode", "max_sweeps", "nudge_sweeps", "tol") + SPIKING_KEYS)
        caps = {}
        for k in ("max_sweeps", "nudge_sweeps"):
            caps[k] = self.typed(a, k, int, t)
            if not 1 <= caps[k] <= MAX_SWEEPS:
                self.error(f"attribute {k!r} must be an integer in [1, {MAX_SWEEPS}]", a[k][1])
        s = Schedule(mode=str(self.typed(a, "mode", str, t)), **caps,
                     tol=self.real(a, "tol", t, lambda v: v >= 0, "a finite number >= 0"))
        s.spiking = self.spiking(a, t)
        self.expect("{")
        self.end_line()
        while not self.accept("}"):
            self.expect("[")
            cls = []
            if not self.accept("]"):
                cls.append(self.name())
                while self.accept(","):
                    cls.append(self.name())
                self.expect("]")
            s.classes.append(cls)
            self.end_line()
        g.schedule = s


def parse(text: str, source: str = "<text>") -> Graph:
    """Parse IR text. A weight the text gives data for (seeded or a literal) comes back as
    an array, a weight only declared as a WeightSpec placeholder (shape and dtype)."""
    return _Parser(text, source).graph()


def looks_like_ir(head: bytes) -> bool:
    """Whether a file starting with `head` is IR text: its first line that is neither
    blank nor a `#` comment starts with the header."""
    for line in head.splitlines():
        line = line.strip()
        if line and not line.startswith(b"#"):
            return line.startswith(HEADER.encode())
    return False


def attach_weights(g: Graph, tensors: dict[str, np.ndarray]) -> Graph:
    """Give a parsed graph's weights the data in `tensors` (shapes must match); a weight
    with neither data in `tensors` nor in the text is an error."""
    from .errors import EpcError
    for name, spec in list(g.weights.items()):
        if name not in tensors:
            if not isinstance(spec, WeightSpec):
                continue            # the text carried it (seeded or a literal)
            raise EpcError(f"weight {name} is declared but has no data")
        arr = tensors[name]
        if tuple(arr.shape) != tuple(spec.shape):
            raise EpcError(f"weight {name}: declared {list(spec.shape)}, data {list(arr.shape)}")
        g.weights[name] = arr
    return g
