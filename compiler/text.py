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

Attribute values: integers, floats (Python repr, so they round-trip), true/false, strings
in double quotes, bare names, weight references @name, lists [a, b] and activation calls
kind(field=value, ...). `#` starts a comment. `print_graph(parse(text)) == text` for any
text the printer produced.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import numpy as np

from .errors import IRSyntaxError
from .ir import (FORMAT_VERSION, OP_TYPES, Activation, Act, Coupling, Cost, Graph, Input,
                 Node, Schedule, State, Teacher, WeightSpec)

HEADER = "epc-ir"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


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


def _dtype(w) -> str:
    if isinstance(w, WeightSpec):
        return w.dtype
    return {"float32": "f32", "float64": "f64", "int64": "i64", "int32": "i32", "int8": "i8",
            "int16": "i16", "uint8": "u8"}.get(str(w.dtype), str(w.dtype))


def print_graph(g: Graph) -> str:
    """The graph as IR text (weights declared by shape, their data lives in the bundle)."""
    out = [f"{HEADER} {FORMAT_VERSION}", f"graph {_name(g.name)} {{"]
    for k, v in g.attrs.items():
        out.append(f"  attr {_name(k)} = {_value(v)}")
    for i in g.inputs:
        out.append(f"  input {_name(i.name)} : {_shape(i.shape)}")
    for name in sorted(g.weights):
        w = g.weights[name]
        out.append(f"  weight {_name(name)} : {_dtype(w)}{_shape(w.shape)}")
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
        out.append(f"  coupling {_name(c.name)} : {_name(c.src)} -> {_name(c.dst)} "
                   f"{_attrs([('kind', _Bare(c.kind)), ('feedback', c.feedback)])} {{")
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
        out.append("  schedule " + _attrs([("mode", _Bare(s.mode)), ("max_sweeps", s.max_sweeps),
                                           ("nudge_sweeps", s.nudge_sweeps),
                                           ("tol", float(s.tol))]) + " {")
        for cls in s.classes:
            out.append("    [" + ", ".join(_name(x) for x in cls) + "]")
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


# =========================================================================== parser
_TOKEN_RE = re.compile(r"""
    (?P<ws>[ \t]+)
  | (?P<comment>\#[^\n]*)
  | (?P<nl>\n)
  | (?P<header>epc-ir\b)
  | (?P<arrow>->)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan)
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
        if t.kind != "number" or not re.fullmatch(r"[-+]?\d+", t.text):
            self.error("expected an integer")
        return int(self.next().text)

    def skip_nl(self):
        while self.peek().kind == "nl":
            self.i += 1

    def end_line(self):
        if self.peek().kind not in ("nl", "eof"):
            self.error("expected end of line")
        self.skip_nl()

    # ---- values
    def value(self) -> Any:
        t = self.peek()
        if t.kind == "number":
            self.next()
            if re.fullmatch(r"[-+]?\d+", t.text):
                return int(t.text)
            return float(t.text)
        if t.kind == "string":
            self.next()
            return json.loads(t.text)
        if t.text == "@":
            self.next()
            return _Ref(self.name("a weight name after @"))
        if t.text == "[":
            self.next()
            items = []
            if not self.accept("]"):
                items.append(self.value())
                while self.accept(","):
                    items.append(self.value())
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

    def activation(self, head: _Tok) -> Activation:
        if head.text not in Activation.KINDS:
            self.error(f"unknown activation (supported: {', '.join(Activation.KINDS)})", head)
        self.expect("(")
        kw = {}
        if not self.accept(")"):
            while True:
                k = self.name("an activation field")
                self.expect("=")
                kw[k] = float(self.value())
                if self.accept(")"):
                    break
                self.expect(",")
        try:
            return Activation(head.text, **kw)
        except TypeError:
            self.error(f"bad fields {sorted(kw)} for activation {head.text}", head)

    def attrs(self) -> dict[str, tuple[Any, _Tok]]:
        self.expect("[")
        out: dict[str, tuple[Any, _Tok]] = {}
        if self.accept("]"):
            return out
        while True:
            t = self.peek()
            k = self.name("an attribute name")
            self.expect("=")
            out[k] = (self.value(), t)
            if self.accept("]"):
                return out
            self.expect(",")

    def shape(self) -> tuple[int, ...]:
        self.expect("[")
        dims = []
        if not self.accept("]"):
            dims.append(self.int_())
            while self.accept(","):
                dims.append(self.int_())
            self.expect("]")
        return tuple(dims)

    # ---- entities
    def op(self, kind_tok: _Tok, attrs: dict[str, tuple[Any, _Tok]]):
        cls = OP_TYPES.get(kind_tok.text)
        if cls is None:
            self.error(f"unknown op (supported: {', '.join(sorted(OP_TYPES))})", kind_tok)
        names = {f.name for f in dataclasses.fields(cls)}
        for k, (_, t) in attrs.items():
            if k not in names:
                self.error(f"op {kind_tok.text} has no attribute {k!r}", t)
        kw = {k: (str(v) if isinstance(v, _Ref) else v) for k, (v, _) in attrs.items()}
        try:
            return cls(**kw)
        except TypeError as e:
            self.error(f"bad attributes for op {kind_tok.text}: {e}", kind_tok)

    def typed(self, attrs, key, kinds, tok, default=None):
        if key not in attrs:
            if default is not None:
                return default
            self.error(f"missing attribute {key!r}", tok)
        v, t = attrs[key]
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in
                                        (kinds if isinstance(kinds, tuple) else (kinds,))):
            self.error(f"attribute {key!r} has the wrong type", t)
        return v

    def graph(self) -> Graph:
        self.skip_nl()
        t = self.peek()
        if t.text != HEADER:
            self.error(f"expected the header '{HEADER} {FORMAT_VERSION}'")
        self.next()
        vt = self.peek()
        version = self.int_()
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
        k = self.name()
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
        n = self.name()
        self.expect(":")
        dt = self.name("a dtype such as f32")
        g.weights[n] = WeightSpec(self.shape(), dt)

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
        a = self.attrs()
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
        a = self.attrs()
        c = Coupling(n, src, dst, [], kind=str(self.typed(a, "kind", str, t)),
                     feedback=self.typed(a, "feedback", bool, t))
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
        a = self.attrs()
        g.costs.append(Cost(n, st, kind=str(self.typed(a, "kind", str, t)),
                            target=str(self.typed(a, "target", str, t)),
                            weight=float(self.typed(a, "weight", (int, float), t)),
                            temperature=float(self.typed(a, "temperature", (int, float), t))))

    def ent_teacher(self, g, t):
        n = self.name()
        a = self.attrs()
        g.teacher = Teacher(n, source=str(self.typed(a, "source", str, t)),
                            output=str(self.typed(a, "output", str, t)),
                            temperature=float(self.typed(a, "temperature", (int, float), t)),
                            mix=float(self.typed(a, "mix", (int, float), t)))

    def ent_schedule(self, g, t):
        a = self.attrs()
        s = Schedule(mode=str(self.typed(a, "mode", str, t)),
                     max_sweeps=self.typed(a, "max_sweeps", int, t),
                     nudge_sweeps=self.typed(a, "nudge_sweeps", int, t),
                     tol=float(self.typed(a, "tol", (int, float), t)))
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
    """Parse IR text. Weights come back as WeightSpec placeholders (shape and dtype)."""
    return _Parser(text, source).graph()


def attach_weights(g: Graph, tensors: dict[str, np.ndarray]) -> Graph:
    """Replace the WeightSpec placeholders of a parsed graph by data (shapes must match)."""
    from .errors import EpcError
    for name, spec in list(g.weights.items()):
        if name not in tensors:
            raise EpcError(f"weight {name} is declared but has no data")
        arr = tensors[name]
        if tuple(arr.shape) != tuple(spec.shape):
            raise EpcError(f"weight {name}: declared {list(spec.shape)}, data {list(arr.shape)}")
        g.weights[name] = arr
    return g
