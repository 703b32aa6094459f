"""The PyTorch frontend: an `nn.Module` -> feedforward IR.

The module is captured with `torch.export.export` (eval mode, one example input, static
shapes) and lowered with `run_decompositions` to core ATen ops, except for a few ops that we
keep whole because the IR has them as one node (linear, hardsigmoid, adaptive average
pooling). The ATen graph is then walked once, in its topological order:

* every value is either an **activation** (depends on the user input; becomes an IR value)
  or a **constant** (parameters, buffers, lifted tensors and anything computed from them
  alone, which we evaluate eagerly, so `W.t()`, `torch.ones(...)` and the like just fold);
* each ATen op applied to an activation has a handler in `_HANDLERS` that makes one call to
  the frontend Builder (frontends/builder.py, shared with the ONNX frontend: it decides what
  the IR looks like, folds batch norms and scales into the Conv/Dense before them, and names
  nodes after the module path that made them); metadata ops (clone, dropout, detach, ...)
  return their input;
* anything else is refused with an EpcError that names the ATen op, the exported node, the
  `nn.Module` it came from and the user's source line, and lists what is supported.

Every translated value's shape is checked against the shape torch recorded for the exported
node. Weights become float32 arrays; a Conv/Linear weight keeps its state_dict name
(sanitized, unique). `load_torch_spec` / `build_module_from_spec` are the CLI path: they
import the user's `module:factory` (only when called) and build the model.

We use torch.export only (no torch.fx.symbolic_trace fallback): symbolic tracing yields
torch-function graphs that would need a second translator, and what export cannot capture
(data-dependent control flow) would not map onto the IR anyway.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import operator
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph
from epc.compiler.verify import problems

from .builder import Builder, Value
from .common import Refused, Unsupported, sanitize

SUPPORTED = ("Linear, Conv2d (groups, stride, padding, dilation), BatchNorm2d/BatchNorm1d "
             "(eval), ReLU/ReLU6/Hardtanh/Hardsigmoid/clamp, MaxPool2d, AvgPool2d, "
             "AdaptiveAvgPool2d (any size) / mean over H,W, Flatten / view / reshape / "
             "permute / transpose that flatten or permute the elements (channel shuffle), "
             "torch.cat along the channels, split / chunk / slicing (step 1, not the batch), "
             "F.pad / ZeroPad2d (constant), Dropout, Identity, residual add of two "
             "activations, add/mul/div by a per-channel constant, softmax/log_softmax at the "
             "output; with --substitute also sigmoid, tanh, SiLU, Hardswish, GELU, Mish, "
             "Softplus, ELU, LeakyReLU and squeeze-excitation gates")

_A = torch.ops.aten

# Ops kept whole instead of decomposed: each is exactly one IR node (or one substitution).
_KEEP = (_A.linear.default, _A.hardsigmoid.default, _A.adaptive_avg_pool2d.default,
         _A.silu.default, _A.hardswish.default, _A.mish.default, _A.softplus.default)

# Ops that do not change values (inference mode): the output is the input.
_PASSTHROUGH = {
    _A.clone.default, _A.alias.default, _A.detach.default, _A.lift_fresh_copy.default,
    _A.contiguous.default, _A.dropout.default, _A.feature_dropout.default,
    _A.alpha_dropout.default, _A.feature_alpha_dropout.default,
}
# Ops that produce no value we use (runtime assertions export inserts).
_IGNORED = {"_assert_tensor_metadata", "_assert_scalar", "_assert_async",
            "sym_constrain_range", "sym_constrain_range_for_size"}

# --------------------------------------------------------------------------- values
@dataclass
class _Const:
    """A value computed from parameters/buffers/constants only; hint names its origin."""

    value: Any                # torch.Tensor or Python scalar
    hint: str | None = None


def _is_act(x) -> bool:
    if isinstance(x, Value):
        return True
    if isinstance(x, (list, tuple)):
        return any(_is_act(y) for y in x)
    return False


def _unwrap(x):
    if isinstance(x, _Const):
        return x.value
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(y) for y in x)
    return x


def _hint(args) -> str | None:
    """The origin name of the single named constant among args (for derived weights)."""
    hints = {a.hint for a in args if isinstance(a, _Const) and a.hint}
    return hints.pop() if len(hints) == 1 else None


def _array(c) -> np.ndarray:
    """A constant (a _Const, a tensor or a Python number) as a numpy array, its own dtype."""
    v = c.value if isinstance(c, _Const) else c
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float64)


# --------------------------------------------------------------------------- translator
class _Lowering:
    """Walks the exported ATen graph once, in order, feeding a Builder."""

    def __init__(self, ep, batch: int, builder: Builder, label: str = ""):
        self.ep = ep
        self.label = label
        self.batch = batch
        self.b = builder
        self.env: dict[Any, Any] = {}
        self.fx_node = None
        self.refusals: list[Refused] = []      # every op refused (the walk goes on)
        self.unknown: set = set()              # nodes after a refusal, left unchecked
        self.ops: dict[str, int] = {}          # ATen ops translated, by name

    def module_path(self, node) -> tuple[str, str]:
        """(module path, class name) of the innermost module that made node."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return "", ""
        path, cls = list(stack.values())[-1]
        cls = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        return path or "", cls.rsplit(".", 1)[-1]

    def where(self, node) -> str:
        path, cls = self.module_path(node)
        parts = [f"node {node.name}"]
        if cls:
            parts.append(f"in module {path or '<root>'} ({cls})")
        loc = _user_line(node)
        if loc:
            parts.append(f"at {loc}")
        return " ".join(parts)

    def fail(self, msg: str, node=None) -> Refused:
        node = node if node is not None else self.fx_node
        op = _op_name(node.target) if node is not None else "?"
        where = f" ({self.where(node)})" if node is not None else ""
        return Refused(f"{self.label}: torch frontend: {msg}: aten op {op}{where}; supported: "
                       f"{SUPPORTED}", op=op, node=self.where(node) if node is not None else "?",
                       reason=msg)

    def check_shape(self, result, node) -> None:
        """The translated value has the per-sample shape torch recorded for node."""
        v = result[0] if isinstance(result, tuple) else result
        meta = _meta_shape(node)
        if not isinstance(v, Value) or meta is None:
            return
        if len(meta) == 0 or meta[0] != self.batch:
            raise self.fail(f"the result {list(meta)} does not keep the batch dimension "
                            f"{self.batch} first", node)
        if tuple(meta[1:]) != tuple(v.shape):
            raise self.fail(f"IR shape {list(v.shape)} differs from the exported shape "
                            f"{list(meta[1:])}", node)

    # ---- the walk
    def run(self) -> None:
        kinds = {spec.arg.name: spec for spec in self.ep.graph_signature.input_specs}
        state = self.ep.state_dict
        consts = getattr(self.ep, "constants", {}) or {}
        for node in self.ep.graph.nodes:
            self.fx_node = node
            if node.op == "placeholder":
                spec = kinds.get(node.name)
                kind = spec.kind.name if spec is not None else "USER_INPUT"
                if kind == "USER_INPUT":
                    self.env[node] = self.input(node)
                elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                    val = state[spec.target] if spec.target in state else consts[spec.target]
                    hint = spec.target if kind != "CONSTANT_TENSOR" else None
                    self.env[node] = _Const(val, hint)
                else:
                    raise EpcError(f"torch frontend: unsupported model input {node.name} of "
                                   f"kind {kind}")
            elif node.op == "get_attr":
                self.env[node] = _Const(getattr(self.ep.graph_module, node.target),
                                        str(node.target))
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "output":
                if self.refusals:
                    return
                for v in node.args[0]:
                    self.output(self.env.get(v) if isinstance(v, torch.fx.Node) else _Const(v))
            else:
                raise self.fail(f"unexpected graph node kind {node.op}", node)

    def input(self, node) -> Value:
        if self.b.g.inputs:
            raise EpcError("torch frontend: the model takes more than one tensor input; epc "
                           "compiles single-input models")
        meta = node.meta.get("val")
        shape = tuple(meta.shape)
        for i, d in enumerate(shape):
            if not isinstance(d, int):
                if i == 0:
                    continue
                raise EpcError(f"torch frontend: input dimension {i} is dynamic ({d}); only "
                               f"the batch dimension may vary")
        if not meta.dtype.is_floating_point:
            raise EpcError(f"torch frontend: the example input is {meta.dtype}, expected a "
                           f"floating point tensor")
        if len(shape) < 2:
            raise EpcError(f"torch frontend: the example input {list(shape)} needs a batch "
                           f"dimension and at least one feature dimension")
        return self.b.input(node.name, shape[1:])

    def output(self, v) -> None:
        if not isinstance(v, Value):
            raise EpcError("torch frontend: a model output does not depend on the input "
                           "(a constant output cannot be compiled)")
        self.b.output(v)

    def call(self, node):
        """One ATen node: its value, or (refused) a stand-in of the exported shape, so
        that the nodes after it are checked too; every refusal is kept in `refusals`."""
        if any(n in self.unknown for n in node.all_input_nodes):
            self.unknown.add(node)        # after a refusal whose result has no known shape
            return None
        try:
            out = self._call(node)
        except Refused as e:
            self.refusals.append(e)
            out = self._stand_in(node, e)
            if out is None or (isinstance(out, tuple) and None in out):
                self.unknown.add(node)
            return out
        except Exception:            # noqa: BLE001 - only past a refusal (stand-in input)
            if not self.refusals:
                raise
            self.unknown.add(node)
            return None
        if isinstance(out, (Value, tuple)) and isinstance(node.target, torch._ops.OpOverload):
            name = _op_name(node.target)
            self.ops[name] = self.ops.get(name, 0) + 1
        return out

    def _stand_in(self, node, refused):
        val = node.meta.get("val")

        def one(v):
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == self.batch:
                return self.b.placeholder(tuple(int(d) for d in v.shape[1:]), refused)
            return None
        if isinstance(val, (list, tuple)):
            return tuple(one(v) for v in val)
        return one(val)

    def _call(self, node):
        tgt = node.target
        if tgt is operator.getitem:
            seq, idx = self.env[node.args[0]], node.args[1]
            if isinstance(seq, _Const):
                return _Const(seq.value[idx], seq.hint)
            if isinstance(seq, tuple):
                if idx != 0 and seq[idx] is None:
                    raise self.fail("use of a secondary result (e.g. max-pool indices)", node)
                return seq[idx]
            raise self.fail("indexing an activation", node)
        opname = getattr(tgt, "_opname", None) or getattr(tgt, "__name__", str(tgt))
        if opname in _IGNORED:
            return None
        args = [self.lookup(a) for a in node.args]
        kwargs = {k: self.lookup(v) for k, v in node.kwargs.items()}
        if not _is_act(args) and not _is_act(list(kwargs.values())):
            return self.fold(node, args, kwargs)
        handler = _HANDLERS.get(tgt)
        if handler is None:
            raise self.fail("unsupported operation", node)
        self.b.at(self.module_path(node)[0], lambda msg: self.fail(msg, node))
        out = handler(self, node, args, kwargs)
        self.check_shape(out, node)
        return out

    def lookup(self, a):
        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.lookup(x) for x in a)
        return a

    def fold(self, node, args, kwargs) -> _Const:
        try:
            with torch.no_grad():
                val = node.target(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
        except Exception as e:  # noqa: BLE001 - a constant we cannot evaluate is a user error
            raise self.fail(f"cannot evaluate constant expression ({_first_line(e)})", node)
        return _Const(val, _hint(list(args) + list(kwargs.values())))


# --------------------------------------------------------------------------- helpers
def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._opname}.{target._overloadname}" \
            if target.namespace == "aten" else str(target)
    return getattr(target, "__name__", str(target))


def _user_line(node) -> str | None:
    """'file.py:LINE' of the innermost user frame that produced node, if recorded."""
    trace = node.meta.get("stack_trace") or ""
    hits = re.findall(r'File "([^"]+)", line (\d+)', trace)
    for path, line in reversed(hits):
        if "/torch/" not in path.replace("\\", "/"):
            return f"{os.path.basename(path)}:{line}"
    return None


def _meta_shape(node) -> tuple | None:
    val = node.meta.get("val") if node is not None else None
    if isinstance(val, (list, tuple)):
        val = val[0] if val else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(val.shape)


def _pair(v, n: int = 2) -> list[int]:
    if isinstance(v, (list, tuple)):
        v = list(v)
        return [int(x) for x in (v * n if len(v) == 1 else v)]
    return [int(v)] * n


def _arg(args, kwargs, i: int, name: str, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _scalar(x) -> float | None:
    if isinstance(x, _Const):
        x = x.value
    if isinstance(x, torch.Tensor):
        return float(x) if x.numel() == 1 else None
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


# --------------------------------------------------------------------------- handlers
# One handler per ATen op (the table _HANDLERS below): read the op's arguments, check what
# only the ATen form can get wrong, and make one Builder call (frontends/builder.py decides
# what the IR looks like). Each returns the Value (or, for ops with several results, a tuple
# whose first entry is the Value).
def _need_act(L: _Lowering, node, x) -> Value:
    if not isinstance(x, Value):
        raise L.fail("the activation must be the first operand", node)
    return x


def _need_const(L: _Lowering, node, c, what: str) -> _Const:
    if not isinstance(c, _Const):
        raise L.fail(f"{what} computed from the input", node)
    return c


def _passthrough(L, node, args, kwargs):
    """clone, alias, detach, contiguous, dropout in eval mode: the value itself."""
    x = _need_act(L, node, args[0])
    if node.target in (_A.dropout.default, _A.feature_dropout.default) and \
            _arg(args, kwargs, 2, "train", False):
        raise L.fail("dropout in training mode", node)
    return x


def _native_dropout(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    if _arg(args, kwargs, 2, "train", False):
        raise L.fail("dropout in training mode", node)
    return (x, None)


def _to_copy(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    dt = kwargs.get("dtype")
    if dt is not None and not dt.is_floating_point:
        raise L.fail(f"conversion of an activation to {dt}", node)
    return x


def _conv(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    w = _need_const(L, node, args[1], "convolution weights")
    b = None if args[2] is None else _need_const(L, node, args[2], "convolution bias")
    stride, padding, dilation, transposed, _out_pad, groups = args[3:9]
    if transposed:
        raise L.fail("transposed convolution (ConvTranspose2d) is not supported", node)
    wt = _array(w)
    if wt.ndim != 4:
        raise L.fail(f"{wt.ndim - 2}-D convolution (only Conv2d is supported)", node)
    p = _pair(padding)
    return L.b.conv(x, wt, None if b is None else _array(b), stride=_pair(stride),
                    pads=[p[0], p[1], p[0], p[1]], dilation=_pair(dilation),
                    groups=int(groups), name=w.hint)


def _conv2d(L, node, args, kwargs):
    # aten.conv2d(input, weight, bias, stride, padding, dilation, groups) (undecomposed form)
    a = list(args) + [None] * 7
    padding = _pair(a[4] if a[4] is not None else 0)
    return _conv(L, node, [a[0], a[1], a[2], a[3] or [1, 1], padding, a[5] or [1, 1], False,
                           [0, 0], a[6] or 1], {})


def _dense(L, node, x, w, b, transpose: bool):
    """x @ w.T (+ b) for linear, x @ w (+ b) for mm / addmm."""
    x = _need_act(L, node, x)
    w = _need_const(L, node, w, "matrix product weights")
    b = None if b is None else _array(_need_const(L, node, b, "bias"))
    wt = _array(w)
    return L.b.dense(x, wt.T if transpose and wt.ndim == 2 else wt, b, name=w.hint)


def _linear(L, node, args, kwargs):
    return _dense(L, node, args[0], args[1], _arg(args, kwargs, 2, "bias"), transpose=False)


def _addmm(L, node, args, kwargs):
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        raise L.fail("addmm with alpha/beta other than 1", node)
    return _dense(L, node, args[1], args[2], args[0], transpose=True)


def _mm(L, node, args, kwargs):
    return _dense(L, node, args[0], args[1], None, transpose=True)


def _batch_norm(L, node, args, kwargs):
    # _native_batch_norm_legit_no_training(x, weight, bias, running_mean, running_var,
    #                                      momentum, eps) -> (out, save_mean, save_rstd)
    x = _need_act(L, node, args[0])
    w, b, mean, var, eps = args[1], args[2], args[3], args[4], args[6]
    if mean is None or var is None:
        raise L.fail("batch norm without running statistics", node)
    for t in (w, b, mean, var):
        if t is not None:
            _need_const(L, node, t, "batch norm statistics")
    c = x.shape[0] if x.shape else 0
    scale = np.ones(c, np.float32) if w is None else _array(w)
    shift = np.zeros(c, np.float32) if b is None else _array(b)
    return (L.b.batchnorm(x, scale, shift, _array(mean), _array(var), float(eps)), None, None)


def _batch_norm_training(L, node, args, kwargs):
    raise L.fail("batch norm in training mode (or without running statistics); call "
                 "module.eval() and keep track_running_stats=True", node)


def _relu(L, node, args, kwargs):
    return L.b.relu(_need_act(L, node, args[0]))


def _hardtanh(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    return L.b.clamp(x, float(_arg(args, kwargs, 1, "min_val", -1.0)),
                     float(_arg(args, kwargs, 2, "max_val", 1.0)))


def _clamp(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    if node.target is _A.clamp_min.default:
        lo, hi = args[1], None
    elif node.target is _A.clamp_max.default:
        lo, hi = None, args[1]
    else:
        lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
    bounds = [None if v is None else _scalar(v) for v in (lo, hi)]
    if any(v is not None and s is None for v, s in zip((lo, hi), bounds)) or \
            bounds == [None, None]:
        raise L.fail("clamp with tensor or empty bounds", node)
    return L.b.clamp(x, *bounds)


def _hardsigmoid(L, node, args, kwargs):
    return L.b.hardsigmoid(_need_act(L, node, args[0]), 1.0 / 6.0, 0.5)


def _maxpool(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    k = _pair(args[1])
    stride = _arg(args, kwargs, 2, "stride", [])
    stride = _pair(stride) if stride not in (None, []) else list(k)
    p = _pair(_arg(args, kwargs, 3, "padding", 0))
    d = _pair(_arg(args, kwargs, 4, "dilation", 1))
    ceil = bool(_arg(args, kwargs, 5, "ceil_mode", False))
    out = L.b.maxpool(x, k, stride, [p[0], p[1], p[0], p[1]], d, ceil)
    return (out, None) if node.target is _A.max_pool2d_with_indices.default else out


def _avgpool(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    k = _pair(args[1])
    stride = _arg(args, kwargs, 2, "stride", [])
    stride = _pair(stride) if stride not in (None, []) else list(k)
    p = _pair(_arg(args, kwargs, 3, "padding", 0))
    ceil = bool(_arg(args, kwargs, 4, "ceil_mode", False))
    cip = bool(_arg(args, kwargs, 5, "count_include_pad", True))
    if _arg(args, kwargs, 6, "divisor_override") is not None:
        raise L.fail("average pooling with divisor_override", node)
    return L.b.avgpool(x, k, stride, [p[0], p[1], p[0], p[1]], cip, ceil)


def _adaptive_avgpool(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    out = [None if o is None else int(o) for o in _pair(args[1])] \
        if not isinstance(args[1], int) else [int(args[1])] * 2
    return L.b.adaptive_avgpool(x, out)


def _mean(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    dims = _arg(args, kwargs, 1, "dim")
    keep = bool(_arg(args, kwargs, 2, "keepdim", False))
    r = len(x.shape) + 1
    dims = sorted({int(d) % r for d in (dims if isinstance(dims, (list, tuple)) else [dims])}) \
        if dims is not None else None
    if r != 4 or dims != [2, 3]:
        raise L.fail(f"mean over dims {dims} (only the spatial dims of an [N, C, H, W] value)",
                     node)
    return L.b.global_avgpool(x, keepdims=keep)


def _reshape(L, node, args, kwargs):
    """view / reshape / flatten / squeeze: the shape torch recorded, batch kept first."""
    x = _need_act(L, node, args[0])
    meta = _meta_shape(node)
    if meta is None:
        raise L.fail("reshape without shape information", node)
    if not meta or meta[0] != L.batch or math.prod(meta[1:]) != math.prod(x.shape):
        raise L.fail(f"reshape of {[L.batch, *x.shape]} to {list(meta)} mixes the batch "
                     f"dimension with the others", node)
    return L.b.reshape(x, meta[1:])


def _flatten(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    start = int(_arg(args, kwargs, 1, "start_dim", 0))
    end = int(_arg(args, kwargs, 2, "end_dim", -1))
    r = len(x.shape) + 1
    if start % r != 1 or end % r != r - 1:
        raise L.fail(f"flatten of dims {start}..{end} (only flatten(1) is supported)", node)
    return _reshape(L, node, args, kwargs)


def _softmax(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    dim = int(args[1]) % (len(x.shape) + 1)
    if dim != 1 or math.prod(x.shape[1:]) != 1:
        raise L.fail(f"softmax over dim {dim} of a {[L.batch, *x.shape]} value (only over "
                     f"the class axis of [N, classes])", node)
    return L.b.softmax(x, log=node.target in (_A._log_softmax.default, _A.log_softmax.int))


def _add(L, node, args, kwargs, sign: float = 1.0):
    a, b = args[0], args[1]
    alpha = _arg(args, kwargs, 2, "alpha", 1)
    if isinstance(a, Value) and isinstance(b, Value):
        if alpha != 1 or sign != 1.0:
            raise L.fail("weighted sum or difference of two activations (only a plain "
                         "residual add is supported)", node)
        return L.b.add([a, b])
    if isinstance(a, Value):
        return L.b.add_constant(a, _array(b).astype(np.float64) * (float(alpha) * sign),
                                "addition" if sign == 1.0 else "subtraction")
    if sign != 1.0 or alpha != 1:
        raise L.fail("constant minus activation", node)
    return L.b.add_constant(_need_act(L, node, b), _array(a))


def _sub(L, node, args, kwargs):
    return _add(L, node, args, kwargs, sign=-1.0)


def _mul(L, node, args, kwargs, divide: bool = False):
    a, b = args[0], args[1]
    if isinstance(a, Value) and isinstance(b, Value):
        if divide:
            raise L.fail("quotient of two activations", node)
        return L.b.product(a, b)
    if divide and not isinstance(a, Value):
        raise L.fail("constant divided by an activation", node)
    x, c = (a, b) if isinstance(a, Value) else (b, a)
    return L.b.mul_constant(x, _array(c), divide=divide)


def _div(L, node, args, kwargs):
    if _arg(args, kwargs, 2, "rounding_mode") is not None:
        raise L.fail("integer / rounding division", node)
    return _mul(L, node, args, kwargs, divide=True)


def _neg(L, node, args, kwargs):
    return L.b.mul_constant(_need_act(L, node, args[0]), -1.0)


def _squeeze(L, node, args, kwargs):
    _need_act(L, node, args[0])
    meta = _meta_shape(node)
    if meta is not None and (not meta or meta[0] != L.batch):
        raise L.fail("squeeze of the batch dimension", node)
    return _reshape(L, node, args, kwargs)


def _dim(L, node, x: Value, dim: int, what: str) -> int:
    """A per-sample axis from an ATen dim over [N, ...]; the batch refused."""
    r = len(x.shape) + 1
    d = int(dim) % r
    if d == 0:
        raise L.fail(f"{what} along the batch dimension", node)
    return d - 1


def _cat(L, node, args, kwargs):
    xs = list(args[0])
    if not all(isinstance(x, Value) for x in xs):
        raise L.fail("concatenation with a constant", node)
    return L.b.concat(xs, _dim(L, node, xs[0], _arg(args, kwargs, 1, "dim", 0),
                               "concatenation"))


def _split(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    d = _dim(L, node, x, _arg(args, kwargs, 2, "dim", 0), "split")
    size = x.shape[d]
    sizes = args[1]
    if isinstance(sizes, int):        # split.Tensor: chunks of `sizes` (the last smaller)
        sizes = [min(sizes, size - i) for i in range(0, size, sizes)]
    out, at = [], 0
    for k in sizes:
        out.append(L.b.slice(x, d, at, at + int(k)))
        at += int(k)
    return tuple(out)


def _slice(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    dim = int(_arg(args, kwargs, 1, "dim", 0))
    start = _arg(args, kwargs, 2, "start", None)
    end = _arg(args, kwargs, 3, "end", None)
    step = int(_arg(args, kwargs, 4, "step", 1))
    r = len(x.shape) + 1
    full = [L.batch, *x.shape][dim % r]
    start = 0 if start is None else int(start)
    end = full if end is None else int(end)
    start, end = (start + full if start < 0 else start), (end + full if end < 0 else end)
    if step != 1:
        raise L.fail(f"slicing with step {step} (only step 1)", node)
    if dim % r == 0:
        if start <= 0 and end >= full:
            return x
        raise L.fail("slicing the batch dimension", node)
    return L.b.slice(x, dim % r - 1, start, min(end, full))


def _select(L, node, args, kwargs):
    """x.select(dim, i) (x[:, i]): a slice of one, then that axis dropped."""
    x = _need_act(L, node, args[0])
    d = _dim(L, node, x, args[1], "indexing")
    i = int(args[2]) % x.shape[d]
    y = L.b.slice(x, d, i, i + 1)
    return L.b.reshape(y, tuple(s for k, s in enumerate(y.shape) if k != d))


def _permute(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    r = len(x.shape) + 1
    dims = [int(d) % r for d in args[1]]
    if dims[0] != 0:
        raise L.fail(f"permute {dims} moves the batch dimension", node)
    return L.b.transpose(x, [d - 1 for d in dims[1:]])


def _transpose(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    r = len(x.shape) + 1
    perm = list(range(r))
    a, b = int(args[1]) % r, int(args[2]) % r
    perm[a], perm[b] = perm[b], perm[a]
    if perm[0] != 0:
        raise L.fail(f"transpose of dims {a} and {b} moves the batch dimension", node)
    return L.b.transpose(x, [d - 1 for d in perm[1:]])


def _constant_pad(L, node, args, kwargs):
    x = _need_act(L, node, args[0])
    pad = [int(p) for p in args[1]]
    value = float(_arg(args, kwargs, 2, "value", 0.0) or 0.0)
    if node.target is _A.pad.default and _arg(args, kwargs, 2, "mode", "constant") != "constant":
        raise L.fail(f"padding mode {_arg(args, kwargs, 2, 'mode')!r} (only constant)", node)
    if node.target is _A.pad.default:
        value = float(_arg(args, kwargs, 3, "value", 0.0) or 0.0)
    r = len(x.shape)
    pads = [0] * (2 * r)
    for k in range(len(pad) // 2):         # F.pad's pairs run from the last dim backwards
        axis = r - 1 - k
        if axis < 0:
            if pad[2 * k] or pad[2 * k + 1]:
                raise L.fail("padding the batch dimension", node)
            continue
        pads[axis], pads[r + axis] = pad[2 * k], pad[2 * k + 1]
    return L.b.pad(x, pads, value)


def _smooth(kind: str):
    def handler(L, node, args, kwargs):
        return L.b.smooth(_need_act(L, node, args[0]), kind)
    return handler


def _layer_norm(L, node, args, kwargs):
    raise L.fail("layer norm normalises by statistics of the value itself: no bilinear "
                 "energy term, no substitution", node)


def _matmul_acts(L, node, args, kwargs):
    if all(isinstance(a, Value) for a in args[:2]):
        raise L.fail("product of two activations (attention): no bilinear energy term, no "
                     "substitution", node)
    raise L.fail("batched matrix product", node)


_HANDLERS = {
    _A.convolution.default: _conv,
    _A.conv2d.default: _conv2d,
    _A.linear.default: _linear,
    _A.addmm.default: _addmm,
    _A.mm.default: _mm,
    _A._native_batch_norm_legit_no_training.default: _batch_norm,
    _A._native_batch_norm_legit.default: _batch_norm_training,
    _A._native_batch_norm_legit.no_stats: _batch_norm_training,
    _A.native_batch_norm.default: _batch_norm_training,
    _A.relu.default: _relu,
    _A.hardtanh.default: _hardtanh,
    _A.clamp.default: _clamp,
    _A.clamp_min.default: _clamp,
    _A.clamp_max.default: _clamp,
    _A.hardsigmoid.default: _hardsigmoid,
    _A.max_pool2d_with_indices.default: _maxpool,
    _A.max_pool2d.default: _maxpool,
    _A.avg_pool2d.default: _avgpool,
    _A.adaptive_avg_pool2d.default: _adaptive_avgpool,
    _A._adaptive_avg_pool2d.default: _adaptive_avgpool,
    _A.mean.dim: _mean,
    _A.view.default: _reshape,
    _A.reshape.default: _reshape,
    _A._unsafe_view.default: _reshape,
    _A.flatten.using_ints: _flatten,
    _A.squeeze.dims: _squeeze,
    _A.squeeze.dim: _squeeze,
    _A.squeeze.default: _squeeze,
    _A._softmax.default: _softmax,
    _A._log_softmax.default: _softmax,
    _A.softmax.int: _softmax,
    _A.log_softmax.int: _softmax,
    _A.add.Tensor: _add,
    _A.add.Scalar: _add,
    _A.sub.Tensor: _sub,
    _A.sub.Scalar: _sub,
    _A.mul.Tensor: _mul,
    _A.mul.Scalar: _mul,
    _A.div.Tensor: _div,
    _A.div.Scalar: _div,
    _A.neg.default: _neg,
    _A.native_dropout.default: _native_dropout,
    _A._to_copy.default: _to_copy,
    _A.cat.default: _cat,
    _A.split.Tensor: _split,
    _A.split_with_sizes.default: _split,
    _A.slice.Tensor: _slice,
    _A.select.int: _select,
    _A.permute.default: _permute,
    _A.transpose.int: _transpose,
    _A.unsqueeze.default: _reshape,
    _A.constant_pad_nd.default: _constant_pad,
    _A.pad.default: _constant_pad,
    _A.sigmoid.default: _smooth("sigmoid"),
    _A.tanh.default: _smooth("tanh"),
    _A.silu.default: _smooth("silu"),
    _A.hardswish.default: _smooth("hardswish"),
    _A.gelu.default: _smooth("gelu"),
    _A.mish.default: _smooth("mish"),
    _A.softplus.default: _smooth("softplus"),
    _A.elu.default: _smooth("elu"),
    _A.leaky_relu.default: _smooth("leakyrelu"),
    _A.native_layer_norm.default: _layer_norm,
    _A.bmm.default: _matmul_acts,
}
for _op in _PASSTHROUGH:
    _HANDLERS[_op] = _passthrough


# --------------------------------------------------------------------------- entry points
def _export(module: torch.nn.Module, example_input: torch.Tensor, label: str):
    table = torch.export.default_decompositions()
    for op in _KEEP:
        if op in table:
            del table[op]
    with warnings.catch_warnings(), _quiet_torch_logs():
        # export warns and logs tracebacks about torch internals; what matters reaches the
        # user as one EpcError line
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(module, (example_input,), strict=False)
        except Exception as e:  # noqa: BLE001 - any capture failure is reported to the user
            raise EpcError(f"{label}: torch.export could not capture the model: "
                           f"{_first_line(e)}")
        try:
            return ep.run_decompositions(table)
        except Exception as e:  # noqa: BLE001
            raise EpcError(f"{label}: lowering the exported model to core ATen ops failed: "
                           f"{_first_line(e)}")


@contextlib.contextmanager
def _quiet_torch_logs():
    """Silence torch's own loggers (restoring their levels afterwards)."""
    loggers = [logging.getLogger("torch")] + [
        lg for name, lg in logging.root.manager.loggerDict.items()
        if name.startswith("torch.") and isinstance(lg, logging.Logger)]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_torch(module: torch.nn.Module, example_input: torch.Tensor, *,
               name: str | None = None, source: str | None = None,
               substitute: bool = False) -> Graph:
    """Translate `module` (run in eval mode on inputs shaped like `example_input`, whose
    first dimension is the batch) into a feedforward-form Graph.

    name:       the graph name (default: the module's class name, sanitized).
    source:     provenance recorded in graph.attrs['source'] (default: the class name).
    substitute: smooth ops become their nearest piecewise-linear form and
                squeeze-excitation gates are dropped (graph.attrs['substituted']).
    Raises EpcError for anything the IR cannot express (`Unsupported`, naming every ATen
    op refused, with its module)."""
    L, label = _lower(module, example_input, name, source, substitute)
    if L.refusals:
        raise Unsupported(label, L.refusals, SUPPORTED)
    return _finish(L, label)


def survey_torch(module: torch.nn.Module, example_input: torch.Tensor, *,
                 name: str | None = None, source: str | None = None,
                 substitute: bool = False) -> dict:
    """What `epc compile --check` reports of a module: the ATen ops translated (by name),
    every refusal, and the graph when nothing was refused."""
    L, label = _lower(module, example_input, name, source, substitute)
    graph, refusals = None, list(L.refusals)
    if not refusals:
        try:
            graph = _finish(L, label)
        except Unsupported as e:
            refusals = e.refusals
    return {"frontend": "torch", "ops": dict(L.ops), "refusals": refusals, "graph": graph,
            "supported": SUPPORTED}


def _lower(module, example_input, name, source, substitute) -> tuple["_Lowering", str]:
    """Export the module and walk its ATen graph (refusals collected, not raised)."""
    if not isinstance(module, torch.nn.Module):
        raise EpcError(f"torch frontend: expected a torch.nn.Module, got "
                       f"{type(module).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise EpcError(f"torch frontend: the example input must be a tensor, got "
                       f"{type(example_input).__name__}")
    cls = type(module).__name__
    label = source or cls
    if example_input.dim() < 2:
        raise EpcError(f"{label}: the example input {list(example_input.shape)} needs a batch "
                       f"dimension first and at least one feature dimension")
    was_training = module.training
    module.eval()
    try:
        ep = _export(module, example_input, label)
    finally:
        module.train(was_training)
    builder = Builder(name or cls, {"source": label, "frontend": "torch"}, substitute=substitute)
    L = _Lowering(ep, int(example_input.shape[0]), builder, label)
    try:
        L.run()
    except Refused as e:
        L.refusals.append(e)
    except EpcError as e:
        raise EpcError(f"{label}: {e}")
    return L, label


def _finish(L: "_Lowering", label: str) -> Graph:
    try:
        g = L.b.finish()
    except Refused as e:
        raise Unsupported(label, [e], SUPPORTED) from None
    if not g.nodes:
        raise EpcError(f"{label}: the model has no operations")
    errs = problems(g)
    if errs:
        raise EpcError(f"{label}: torch frontend produced invalid IR: {'; '.join(errs[:4])}")
    return g


_SOFTMAXES = (_A._softmax.default, _A._log_softmax.default, _A.softmax.int, _A.log_softmax.int)


def logits_function(module: torch.nn.Module, example_input: torch.Tensor):
    """The module as a function of its input that stops before its output softmax (what
    `--verify` compares: the logits), in the dtype of `example_input`. The module captured
    by torch.export with its one output's softmax cut off; a module whose output is no
    softmax is refused (the caller compares outputs then)."""
    with warnings.catch_warnings(), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        try:
            gm = torch.export.export(module, (example_input,), strict=False).module()
        except Exception as e:  # noqa: BLE001
            raise EpcError(f"--verify: torch.export could not capture the model for its "
                           f"logits: {_first_line(e)}")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out.args[0]
    last = outs[0] if isinstance(outs, (list, tuple)) and len(outs) == 1 else None
    if not isinstance(last, torch.fx.Node) or last.target not in _SOFTMAXES:
        raise EpcError("--verify: the module's output is not a softmax; no logits to cut out")
    out.args = ((last.args[0],),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return lambda x: gm(x)[0]


def _load_object(spec: str):
    """Resolve `module.path:attr` or `path/to/file.py:attr` to the Python object."""
    mod_part, sep, attr = spec.rpartition(":")
    if not sep or not mod_part or not attr:
        raise EpcError(f"{spec}: expected a PyTorch model spec 'package.module:factory' or "
                       f"'path/to/file.py:factory'")
    if mod_part.endswith(".py") or os.sep in mod_part or "/" in mod_part:
        path = os.path.abspath(mod_part)
        if not os.path.isfile(path):
            raise EpcError(f"{spec}: no such file {mod_part}")
        mod_name = "_epc_user_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        try:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise EpcError(f"{spec}: cannot import {mod_part} as a Python file")
            mod = importlib.util.module_from_spec(loader_spec)
            # let relative imports of sibling files work, as when running the file
            added = os.path.dirname(path) not in sys.path
            if added:
                sys.path.insert(0, os.path.dirname(path))
            try:
                sys.modules[mod_name] = mod
                loader_spec.loader.exec_module(mod)
            finally:
                if added:
                    sys.path.remove(os.path.dirname(path))
        except EpcError:
            raise
        except Exception as e:  # noqa: BLE001 - user code failing on import
            sys.modules.pop(mod_name, None)
            raise EpcError(f"{spec}: importing {mod_part} failed: {_first_line(e)}")
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # `epc compile mypkg.model:net` from a project dir
        try:
            mod = importlib.import_module(mod_part)
        except ModuleNotFoundError as e:
            raise EpcError(f"{spec}: cannot import module {mod_part} ({_first_line(e)})")
        except Exception as e:  # noqa: BLE001
            raise EpcError(f"{spec}: importing {mod_part} failed: {_first_line(e)}")
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise EpcError(f"{spec}: {mod_part} has no attribute {attr}")
        obj = getattr(obj, part)
    return obj


def build_module_from_spec(spec: str, input_shape: tuple[int, ...]
                           ) -> tuple[torch.nn.Module, torch.Tensor]:
    """Import `spec`, build the module (calling the factory / class with no arguments) and
    make a seeded random example input of `input_shape` (batch first)."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise EpcError(f"{spec}: --input-shape {','.join(map(str, shape))} must have a batch "
                       f"dimension and at least one positive feature dimension, e.g. 1,3,32,32")
    obj = _load_object(spec)
    if isinstance(obj, torch.nn.Module):
        module = obj
    elif callable(obj):
        try:
            # an untrained factory initialises its weights from torch's global generator:
            # seed it (and restore it after) so compiling one spec twice gives one bundle
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                module = obj()
        except Exception as e:  # noqa: BLE001 - user factory failing
            raise EpcError(f"{spec}: calling {spec.rpartition(':')[2]}() failed: "
                           f"{_first_line(e)}")
    else:
        raise EpcError(f"{spec}: {spec.rpartition(':')[2]} is a {type(obj).__name__}, not an "
                       f"nn.Module or a callable returning one")
    if not isinstance(module, torch.nn.Module):
        raise EpcError(f"{spec}: {spec.rpartition(':')[2]} returned a {type(module).__name__}, "
                       f"expected a torch.nn.Module")
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(shape, generator=gen)
    return module, example


def load_torch_spec(spec: str, input_shape: tuple[int, ...], *,
                    name: str | None = None) -> Graph:
    """The CLI path: `pkg.module:factory` or `path/to/file.py:factory` -> feedforward Graph."""
    module, example = build_module_from_spec(spec, input_shape)
    return load_torch(module, example, name=name or spec.rpartition(":")[2], source=spec)


__all__ = ["load_torch", "survey_torch", "load_torch_spec", "build_module_from_spec",
           "logits_function", "sanitize", "SUPPORTED"]
