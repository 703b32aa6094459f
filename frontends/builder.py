"""The frontend builder: the one place where source operations become feedforward IR.

Both frontends walk their source graph (an ONNX graph, a torch.export ATen graph) and map
each source op onto one call here; everything that decides what the IR looks like lives in
this module, so that one model gives one IR text whichever way it arrives:

* each method checks what the IR can express and refuses the rest through the hook the
  frontend set with `at()` (which names the source node, its file and what is supported);
* what computes nothing at inference (Identity, Dropout, a float Cast, a no-op Pad, a
  reshape or flatten to the same shape, a product by ones, an unbounded clamp) returns its
  input and adds no node;
* constant addends and factors are stored per channel when they are uniform over each
  channel ([C] for a vector value, [C, 1, 1] for a feature map), else in the value's full
  per-sample shape; products must be per channel. A bias is kept even when it is zero: a
  zero-initialised bias is still a parameter EP trains;
* `finish()` fuses a ReLU/clip followed by an upper-bound-only clamp into one clip, checks
  that a Softmax is only at the output, folds every BatchNorm and per-channel scale into
  the Conv/Dense before it and merges consecutive biases (compiler.passes.canonicalize's
  own rewrites, so the arithmetic and therefore the compiled bits are the same whether the
  frontend or the pass folds), and names everything.

The calls: `input`; `dense`, `conv` (with an optional bias), `batchnorm`, `add_constant`,
`mul_constant`; `relu`, `clamp`, `hardsigmoid`, `act`; `maxpool`, `avgpool`,
`global_avgpool`, `adaptive_avgpool`; `flatten`, `reshape`; `add` (residual join);
`softmax`; `output`; then `finish()`. A new source op for both frontends is a method here
(if the IR needs a new shape of call), a rule in frontends/onnx.py `_RULES` and a handler
in frontends/torch.py `_HANDLERS`.

Naming. Every source op comes with a scope: its module path in PyTorch (`stages.0.conv1`),
the same path read back from a torch-exported ONNX file (legacy node names like
`/stages/stages.0/conv1/Conv`, the dynamo exporter's `name_scopes` metadata), or the
node's own name in any other ONNX file. After folding, in source order:

* a Conv/Dense whose weight is a `<path>.weight` parameter is named `<path>`;
* the Bias right after a Conv/Dense is `<that node>_bias`;
* any other node is named by its scope: the scope itself when no other scope lies inside
  it (a leaf module: `relu1`), `<scope>.<kind>` inside a container (`stages.0.relu`,
  `stages.0.add`), `<kind>` at the root (`flatten`); repeats get `_1`, `_2`, ...;
* weights are named after the node that uses them: `<node>.weight` for a Conv/Dense (its
  state_dict name when it has one), `<conv or dense>.bias` for the Bias after it,
  `<node>.bias` for any other Bias, `<node>.scale` for a ChannelScale.

Scopes, not source op or tensor names, decide: the ATen graph, the legacy exporter and the
dynamo exporter number their ops differently (`relu_3`, `Relu_1`, `node_relu_3`) and an
exporter that folds a BatchNorm into its conv names the result anonymously
(`onnx::Conv_145`, `stages.0.conv1.weight_bias`), but all agree on module paths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from epc.compiler import ops as O
from epc.compiler.errors import EpcError
from epc.compiler.ir import (Act, Activation, AdaptiveAvgPool, Add, AvgPool, BatchNorm, Bias,
                             ChannelScale, Concat, Conv, Dense, Flatten, GlobalAvgPool, Graph,
                             Identity, Input, MaxPool, Node, Pad, Permute, Softmax, op_weights)
from epc.compiler.passes.canonicalize import simplify

from .common import NameTable, sanitize

Refuse = Callable[[str], Exception]


@dataclass(frozen=True)
class Value:
    """A computed value: an IR input or node output, with its per-sample shape."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class View(Value):
    """A reshape/transpose of `base` whose shape no IR op takes (a per-sample rank other
    than 1 and 3, e.g. the [g, C/g, H, W] of a channel shuffle): pending until more
    reshapes and transposes bring it back to one (then it is a Permute of the base), else
    refused, naming the op that made it, by whatever reads it.

    factors: base's elements as a row-major array of these sizes (a refinement of its
    axes, sizes of 1 left out); order: the factors' order now; groups: how many factors
    make each current axis, in order."""

    base: Value | None = None
    factors: tuple[int, ...] = ()
    order: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()
    origin: tuple = ()            # (scope, refusal hook) of the op that made it


# Smooth ops: no bilinear energy term. kind -> (name in messages, what --substitute makes
# of it, as text); the substitution itself is Builder.smooth's.
SMOOTH = {
    "sigmoid": ("Sigmoid", "a hard sigmoid (slope 1/4, the sigmoid's at 0)"),
    "tanh": ("Tanh", "a clip to [-1, 1] (hardtanh)"),
    "silu": ("SiLU", "the clipped ReLU"),
    "hardswish": ("HardSwish", "the clipped ReLU"),
    "gelu": ("GELU", "the clipped ReLU"),
    "mish": ("Mish", "the clipped ReLU"),
    "softplus": ("Softplus", "the clipped ReLU"),
    "elu": ("ELU", "the clipped ReLU"),
    "leakyrelu": ("LeakyReLU", "the clipped ReLU"),
}


class Builder:
    """Builds one feedforward Graph from calls in source order; `finish()` returns it."""

    def __init__(self, name: str, attrs: dict[str, str], *, substitute: bool = False):
        self.g = Graph(name=sanitize(name, "model"), attrs=dict(attrs))
        self.scope = ""
        self._refuse: Refuse = EpcError
        self._inputs = NameTable()
        # per node (by its provisional name): (scope, refusal hook) of the source op that
        # made it, and for a Conv/Dense the source name of its weight
        self._origin: dict[str, tuple[str, Refuse]] = {}
        self._source_weight: dict[str, str] = {}
        # nodes a reshape/transpose made (Permute, Flatten): the view of its base they are,
        # so that further reshapes compose from the base
        self._views: dict[str, View] = {}
        # --substitute: smooth ops become their nearest piecewise-linear form, gates go
        self.substitute = substitute
        self._gate_of: dict[str, str] = {}       # (hard) sigmoid node -> the value it gates
        # what the substitution changed: (what, scope, the node it made or None)
        self._substituted: list[tuple[str, str, str | None]] = []
        self._placeholders: list[str] = []

    # ------------------------------------------------------------------ source position
    def at(self, scope: str, refuse: Refuse) -> None:
        """The source op about to be translated: its scope (module path or node name) and
        the hook that turns a message into the frontend's error naming that op."""
        self.scope = sanitize(scope, "op") if scope else ""
        self._refuse = refuse

    def refuse(self, msg: str, *, substitutable: bool = False) -> Exception:
        """The current source op cannot be expressed (raise the returned error);
        `substitutable`: --substitute would replace it."""
        e = self._refuse(msg)
        if substitutable and hasattr(e, "substitutable"):
            e.substitutable = True
        return e

    # ------------------------------------------------------------------ values and weights
    def input(self, name: str, shape) -> Value:
        v = Value(self._inputs.unique(name, "input"), tuple(int(d) for d in shape))
        self.g.inputs.append(Input(v.name, v.shape))
        return v

    def weight(self, arr, name: str) -> str:
        """Register a float32 copy of `arr` under `name` (sanitized; suffixed when taken by
        a different tensor). The same tensor under the same name is one weight (ties)."""
        src = np.asarray(arr)
        if src.dtype.kind not in "fiub":
            raise self.refuse(f"a weight of {src.dtype} data (epc reads real numbers)")
        with np.errstate(all="ignore"):
            arr = np.array(src, dtype=np.float32, copy=True, order="C")
        if not np.all(np.isfinite(arr)):
            raise self.refuse(f"it makes weight {sanitize(name, 'w')} hold values that are not "
                              f"finite in float32 (NaN, Inf, or beyond 3.4e38: e.g. a division "
                              f"by a constant near zero)")
        base = sanitize(name, "w")
        out, i = base, 1
        while out in self.g.weights:
            old = self.g.weights[out]
            if old.shape == arr.shape and np.array_equal(old, arr):
                return out
            out, i = f"{base}_{i}", i + 1
        self.g.weights[out] = arr
        return out

    def _emit(self, op, inputs: list[Value]) -> Value:
        inputs = [self.settle(v) for v in inputs]
        try:
            shape = tuple(int(d) for d in O.out_shape(op, [v.shape for v in inputs],
                                                       self.g.weights))
        except EpcError as e:
            raise self.refuse(str(e)) from None
        name = f"_n{len(self._origin)}"     # provisional: finish() names every node
        self._origin[name] = (self.scope, self._refuse)
        self.g.nodes.append(Node(name, op, [v.name for v in inputs], shape))
        return Value(name, shape)

    def settle(self, x: Value) -> Value:
        """x as a value IR ops can read: a pending View (a per-sample rank other than 1
        and 3) is refused, naming the reshape or transpose that made it."""
        if not isinstance(x, View):
            return x
        scope, hook = x.origin
        raise hook(f"reshape/transpose to a per-sample {list(x.shape)} value that no later "
                   f"reshape turns back into [features] or [C, H, W] (epc's values); only "
                   f"flattening and permutations of the elements (a channel shuffle) are "
                   f"supported")

    def placeholder(self, shape, refused: Exception | None = None) -> Value:
        """A stand-in for the output of a refused source op, so that the ops after it are
        still checked (a frontend collects every refusal of a model); the graph is not
        finished then. A refused sigmoid's stand-in is still a gate of its input."""
        v = Value(f"?{len(self._placeholders)}", tuple(int(d) for d in shape))
        self._placeholders.append(v.name)
        gate = getattr(refused, "gate_of", None)
        if gate is not None:
            self._gate_of[v.name] = gate
        return v

    def need_rank(self, x: Value, rank: int, what: str) -> None:
        x = self.settle(x)
        if len(x.shape) != rank:
            want = {1: "[features]", 3: "[C, H, W]"}.get(rank, f"rank {rank}")
            raise self.refuse(f"{what} needs a per-sample {want} value, got {list(x.shape)}")

    def _per_sample(self, c, x: Value, what: str) -> np.ndarray:
        """A constant broadcast to x's per-sample shape (float64); a leading batch axis of
        size 1 is allowed, a constant that varies along the batch is not."""
        c = np.asarray(c, dtype=np.float64)
        r = len(x.shape)
        if c.ndim > r:
            if c.ndim != r + 1 or c.shape[0] != 1:
                raise self.refuse(f"{what} by a constant of shape {list(c.shape)} that varies "
                                  f"along the batch axis")
            c = c[0]
        try:
            return np.broadcast_to(c, x.shape)
        except ValueError:
            raise self.refuse(f"{what} by a constant of shape {list(c.shape)} that does not "
                              f"broadcast to the per-sample shape {list(x.shape)}") from None

    @staticmethod
    def _channel_vector(full: np.ndarray) -> np.ndarray | None:
        """[C] when `full` is uniform over each channel (axis 0), else None (also for a
        per-sample scalar, which has no channels)."""
        if full.ndim == 0:
            return None
        flat = full.reshape(full.shape[0], -1)
        return flat[:, 0].copy() if np.all(flat == flat[:, :1]) else None

    # ------------------------------------------------------------------ linear ops
    def dense(self, x: Value, w, bias=None, *, name: str | None = None) -> Value:
        """y = w x (+ bias); w is [out, in], `name` the weight's source name."""
        x = self.settle(x)
        w = np.asarray(w)
        if w.ndim != 2:
            raise self.refuse(f"matrix product with a {w.ndim}-D weight (needs 2-D)")
        if len(x.shape) != 1:
            raise self.refuse(f"a linear layer (matrix product) needs a per-sample [features] "
                              f"value, got {list(x.shape)}; flatten it first")
        y = self._linear(Dense, x, w, name, {})
        return y if bias is None else self.add_constant(y, bias)

    def conv(self, x: Value, w, bias=None, *, stride, pads, dilation, groups: int = 1,
             name: str | None = None) -> Value:
        """2-D convolution; w is [C_out, C_in/groups, kH, kW], pads [h0, w0, h1, w1]."""
        x = self.settle(x)
        w = np.asarray(w)
        if w.ndim != 4 or len(x.shape) != 3:
            raise self.refuse(f"only 2-D convolution is supported (weight of rank {w.ndim}, "
                              f"per-sample input {list(x.shape)})")
        y = self._linear(Conv, x, w, name, dict(
            stride=[int(s) for s in stride], pads=[int(p) for p in pads],
            dilation=[int(d) for d in dilation], groups=int(groups)))
        if bias is None:
            return y
        return self.add_constant(y, np.asarray(bias, dtype=np.float64).reshape(-1, 1, 1))

    def _linear(self, cls, x: Value, w: np.ndarray, name: str | None, fields: dict) -> Value:
        name = name or (f"{self.scope}.weight" if self.scope else "weight")
        wname = self.weight(w, name)
        y = self._emit(cls(wname, **fields), [x])
        self._source_weight[y.name] = sanitize(name, "w")
        return y

    def batchnorm(self, x: Value, scale, shift, mean, var, epsilon: float) -> Value:
        """Inference batch norm over the channel axis (folded by finish())."""
        x = self.settle(x)
        c = x.shape[0] if x.shape else 0
        if len(x.shape) not in (1, 3):
            raise self.refuse(f"batch norm of a per-sample {list(x.shape)} value (needs [C] "
                              f"or [C, H, W])")
        names = []
        for what, v in (("scale", scale), ("shift", shift), ("mean", mean), ("var", var)):
            v = np.asarray(v)
            if v.shape != (c,):
                raise self.refuse(f"batch norm {what} of shape {list(v.shape)} does not match "
                                  f"{c} channels")
            names.append(self.weight(v, f"{self.scope or 'bn'}.{what}"))
        return self._emit(BatchNorm(*names, epsilon=float(epsilon)), [x])

    def add_constant(self, x: Value, c, what: str = "addition") -> Value:
        """x + c (a bias; a subtraction adds -c; `what` names it in refusals)."""
        x = self.settle(x)
        full = self._per_sample(c, x, what)
        vec = self._channel_vector(full)
        b = full.copy() if vec is None else vec.reshape((x.shape[0],) + (1,) * (len(x.shape) - 1))
        return self._emit(Bias(self.weight(b, f"{self.scope or 'add'}.bias")), [x])

    def mul_constant(self, x: Value, c, divide: bool = False) -> Value:
        """x * c (or x / c) for a constant c uniform over each channel."""
        x = self.settle(x)
        what = "division" if divide else "product"
        if not x.shape:
            raise self.refuse(f"{what} of a per-sample scalar (epc's values are [features] "
                              f"or [C, H, W])")
        vec = self._channel_vector(self._per_sample(c, x, what))
        if vec is None:
            raise self.refuse(f"{what} by a constant that varies within a channel (the IR "
                              f"scales whole channels only)")
        if divide:
            if np.any(vec == 0):
                raise self.refuse("division by a constant containing zero")
            vec = 1.0 / vec
        if np.all(vec == 1.0):
            return x
        return self._emit(ChannelScale(self.weight(vec, f"{self.scope or 'mul'}.scale")), [x])

    # ------------------------------------------------------------------ nonlinearities
    def act(self, x: Value, fn: Activation) -> Value:
        return self._emit(Act(fn), [x])

    def relu(self, x: Value) -> Value:
        return self.act(x, Activation.relu())

    def hardsigmoid(self, x: Value, alpha: float, beta: float) -> Value:
        x = self.settle(x)
        y = self.act(x, Activation.hardsigmoid(alpha, beta))
        self._gate_of[y.name] = x.name     # a gate, if a product uses it so
        return y

    def clamp(self, x: Value, lo: float | None, hi: float | None) -> Value:
        """clip(x, lo, hi); None or an infinity is no bound on that side."""
        lo = -np.inf if lo is None else float(lo)
        hi = np.inf if hi is None else float(hi)
        if np.isnan(lo) or np.isnan(hi) or lo > hi:
            raise self.refuse(f"clamp to [{lo}, {hi}]: needs min <= max")
        if lo == -np.inf and hi == np.inf:
            return x
        if hi == np.inf:
            if lo == 0.0:
                return self.relu(x)
            raise self.refuse(f"clamp with only a lower bound {lo} (only 0, i.e. ReLU, is "
                              f"supported)")
        # lo = -inf: an upper bound alone; finish() fuses it into the ReLU/clip before it
        return self.act(x, Activation.clip(lo, hi))

    # ------------------------------------------------------------------ smooth ops and gates
    def smooth(self, x: Value, kind: str) -> Value:
        """A smooth activation (SMOOTH): refused, or with --substitute its nearest
        piecewise-linear form (a clipped ReLU, a hard sigmoid, a clip to [-1, 1])."""
        x = self.settle(x)
        name, instead = SMOOTH[kind]
        if not self.substitute:
            e = self.refuse(f"{name} is smooth: no bilinear energy term (--substitute makes "
                            f"it {instead})", substitutable=True)
            if kind == "sigmoid":
                e.gate_of = x.name      # its placeholder is a gate (see placeholder)
            raise e
        if kind == "sigmoid":
            y = self.act(x, Activation.hardsigmoid(0.25, 0.5))
            self._gate_of[y.name] = x.name
        elif kind == "tanh":
            y = self.act(x, Activation.clip(-1.0, 1.0))
        else:
            y = self.relu(x)
        self._substituted.append((f"{name} -> {instead}", self.scope, y.name))
        return y

    def product(self, a: Value, b: Value) -> Value:
        """The product of two computed values: with --substitute, x * sigmoid(x) (SiLU or
        HardSwish written out) becomes the clipped ReLU of x and a squeeze-excitation gate
        (x times a sigmoid of a squeezed [C, 1, 1] value) is dropped; else refused."""
        a, b = self.settle(a), self.settle(b)
        gate, x = (b, a) if b.name in self._gate_of else (a, b)
        if gate.name not in self._gate_of:
            raise self.refuse("product of two computed values (a gate or an attention "
                              "product has no bilinear energy term)")
        selfgate = self._gate_of[gate.name] == x.name
        squeeze = (len(gate.shape) == len(x.shape) and gate.shape != x.shape and
                   all(d in (1, e) for d, e in zip(gate.shape, x.shape)))
        if not self.substitute and (selfgate or squeeze):
            what, fix = (("x * sigmoid(x), a SiLU/HardSwish written out", "makes it the "
                          "clipped ReLU") if selfgate else
                         ("a squeeze-excitation gate", "drops the gate"))
            raise self.refuse(f"product of two computed values ({what}) has no bilinear "
                              f"energy term (--substitute {fix})", substitutable=True)
        if selfgate:
            y = self.relu(x)
            self._substituted.append(("x * sigmoid(x) (SiLU/HardSwish) -> the clipped ReLU",
                                      self.scope, y.name))
            return y
        if squeeze:
            self._substituted.append(("squeeze-excitation gate dropped (x * gate -> x)",
                                      self.scope, None))
            return x
        raise self.refuse(f"product of a value {list(x.shape)} and a gate {list(gate.shape)} "
                          f"of its own size (no bilinear energy term, no substitution)")

    # ------------------------------------------------------------------ pooling and shape
    def maxpool(self, x: Value, kernel, stride, pads, dilation=(1, 1),
                ceil_mode: bool = False) -> Value:
        self.need_rank(x, 3, "max pooling (2-D only)")
        k, d = [int(v) for v in kernel], [int(v) for v in dilation]
        pads = [int(p) for p in pads]
        eff = [(kk - 1) * dd + 1 for kk, dd in zip(k, d)]
        if any(2 * p > e for p, e in zip(pads, eff + eff)):
            raise self.refuse(f"max pooling with padding {pads} larger than half the "
                              f"(dilated) kernel {eff}")
        return self._emit(MaxPool(k, [int(s) for s in stride], pads, d, bool(ceil_mode)), [x])

    def avgpool(self, x: Value, kernel, stride, pads, count_include_pad: bool = False,
                ceil_mode: bool = False) -> Value:
        self.need_rank(x, 3, "average pooling (2-D only)")
        k, pads = [int(v) for v in kernel], [int(p) for p in pads]
        if (pads[0] != pads[2] or pads[1] != pads[3]) and ceil_mode:
            raise self.refuse(f"average pooling with asymmetric padding {pads} and ceil_mode")
        if any(2 * p > kk for p, kk in zip(pads, k + k)):
            raise self.refuse(f"average pooling with padding {pads} larger than half the "
                              f"kernel {k}")
        return self._emit(AvgPool(k, [int(s) for s in stride], pads, bool(count_include_pad),
                                  bool(ceil_mode)), [x])

    def global_avgpool(self, x: Value, keepdims: bool = True) -> Value:
        self.need_rank(x, 3, "global average pooling (mean over H, W)")
        return self._emit(GlobalAvgPool(keepdims=bool(keepdims)), [x])

    def adaptive_avgpool(self, x: Value, out_hw) -> Value:
        """Adaptive average pooling to out_hw (None keeps that side): global, identity, an
        average pool when the windows are equal and disjoint, else an AdaptiveAvgPool
        (windows of unequal size, overlapping ones, or an output larger than the input)."""
        self.need_rank(x, 3, "adaptive average pooling")
        h, w = x.shape[1], x.shape[2]
        out = [h if o is None else int(o) for o in out_hw]
        if any(o <= 0 for o in out):
            raise self.refuse(f"adaptive average pooling to {out}")
        if out == [1, 1]:
            return self.global_avgpool(x, keepdims=True)
        if out == [h, w]:
            return x
        if h % out[0] == 0 and w % out[1] == 0:
            k = [h // out[0], w // out[1]]
            return self.avgpool(x, k, k, [0, 0, 0, 0])
        return self._emit(AdaptiveAvgPool(out), [x])

    def pad(self, x: Value, pads, value: float = 0.0) -> Value:
        """Constant padding of the per-sample value: pads [b_0.., e_0..] (ONNX order,
        negative entries crop); a non-zero `value` fills the pad with a constant (a bias
        over the padded border)."""
        x = self.settle(x)
        pads = [int(p) for p in pads]
        r = len(x.shape)
        if len(pads) != 2 * r:
            raise self.refuse(f"pad {pads} for a per-sample {list(x.shape)} value")
        if not any(pads):
            return x
        y = self._emit(Pad(pads), [x])
        if value != 0.0:
            inside = np.zeros(y.shape)
            inside[tuple(slice(max(pads[i], 0), max(pads[i], 0) + x.shape[i] + min(pads[i], 0)
                               + min(pads[r + i], 0)) for i in range(r))] = 1.0
            y = self.add_constant(y, float(value) * (1.0 - inside), "padding value")
        return y

    def slice(self, x: Value, axis: int, start: int, end: int) -> Value:
        """Elements start..end-1 (step 1) along per-sample axis `axis` (a crop)."""
        x = self.settle(x)
        if not 0 <= axis < len(x.shape):
            raise self.refuse(f"slice along per-sample axis {axis} of {list(x.shape)}")
        size = x.shape[axis]
        start, end = max(0, min(int(start), size)), max(0, min(int(end), size))
        if end <= start:
            raise self.refuse(f"slice {start}:{end} of axis {axis} ({size}) is empty")
        pads = [0] * (2 * len(x.shape))
        pads[axis], pads[len(x.shape) + axis] = -start, -(size - end)
        return self.pad(x, pads)

    def concat(self, xs: list[Value], axis: int) -> Value:
        """Concatenation of computed values along per-sample axis `axis` (the channels)."""
        xs = [self.settle(x) for x in xs]
        if len(xs) == 1:
            return xs[0]
        if axis != 0:
            where = "spatial " if len(xs[0].shape) == 3 else ""
            raise self.refuse(f"concatenation along the {where}axis {axis + 1} of [N, "
                              f"{', '.join(map(str, xs[0].shape))}] (only along the channels, "
                              f"axis 1)")
        return self._emit(Concat(0), list(xs))

    def flatten(self, x: Value) -> Value:
        """[d0, d1, ...] -> [d0 * d1 * ...] per sample (a vector stays as it is)."""
        return x if len(x.shape) == 1 else self.reshape(x, (int(np.prod(x.shape)),))

    def reshape(self, x: Value, shape) -> Value:
        """A per-sample reshape. Composed with the reshapes and transposes before it: the
        same shape is nothing, a plain reshape to a vector a Flatten, a permutation of the
        elements a Permute; a shape no IR op takes stays pending (a View)."""
        shape = tuple(int(d) for d in shape)
        if shape == x.shape:
            return x
        if int(np.prod(shape)) != int(np.prod(x.shape)):
            raise self.refuse(f"reshape of a per-sample {list(x.shape)} value to {list(shape)}")
        base, f, o, gr = self._view(x)
        if list(o) == sorted(o):           # no transpose so far: a plain reshape of the base
            f, o = [d for d in shape if d != 1], list(range(len([d for d in shape if d != 1])))
            gr = [0 if d == 1 else 1 for d in shape]
        else:
            regrouped = _regroup(list(f), list(o), shape)
            if regrouped is None:
                raise self.refuse(f"reshape of a per-sample {list(x.shape)} value to "
                                  f"{list(shape)} after a transpose is not a permutation of "
                                  f"whole axes epc can express")
            f, o, gr = regrouped
        return self._close_view(base, f, o, gr, shape)

    def transpose(self, x: Value, perm) -> Value:
        """The per-sample axes in the order `perm` (the batch stays first)."""
        perm = [int(p) for p in perm]
        if sorted(perm) != list(range(len(x.shape))):
            raise self.refuse(f"transpose {perm} of a per-sample {list(x.shape)} value")
        if perm == sorted(perm):
            return x
        base, f, o, gr = self._view(x)
        runs, at = [], 0
        for n in gr:
            runs.append(list(o[at:at + n]))
            at += n
        o = [i for p in perm for i in runs[p]]
        gr = [gr[p] for p in perm]
        shape = tuple(int(x.shape[p]) for p in perm)
        return self._close_view(base, list(f), o, gr, shape)

    def _view(self, x: Value):
        """(base, factors, order, groups) of x as a view of a value nodes can read."""
        v = x if isinstance(x, View) else self._views.get(x.name)
        if v is not None:
            return v.base, list(v.factors), list(v.order), list(v.groups)
        f = [d for d in x.shape if d != 1]
        return x, f, list(range(len(f))), [0 if d == 1 else 1 for d in x.shape]

    def _close_view(self, base: Value, f: list, o: list, gr: list, shape: tuple) -> Value:
        """The value `shape` of base's elements in factor order o: base itself, a Flatten,
        a Permute, or (a shape no op takes) a pending View."""
        ident = o == sorted(o)
        if ident and shape == base.shape:
            return base
        v = View("", shape, base, tuple(f), tuple(o), tuple(gr), (self.scope, self._refuse))
        if len(shape) not in (1, 3):
            return v
        if ident and len(shape) == 1:
            y = self._emit(Flatten(), [base])
        else:
            dims, perm = _canonical_permutation(f, o)
            y = self._emit(Permute(dims, perm, list(shape)), [base])
        self._views[y.name] = v
        return y

    # ------------------------------------------------------------------ joins and output
    def add(self, xs: list[Value]) -> Value:
        """Elementwise sum of computed values of one shape (a residual join)."""
        xs = [self.settle(x) for x in xs]
        if len(xs) == 1:
            return xs[0]
        shapes = sorted({x.shape for x in xs})
        if len(shapes) != 1:
            raise self.refuse(f"sum of differently shaped values {[list(s) for s in shapes]} "
                              f"(no broadcasting between computed values)")
        return self._emit(Add(), list(xs))

    def softmax(self, x: Value, log: bool = False) -> Value:
        """Softmax / LogSoftmax over the class axis (of [classes] or [classes, 1, 1]); only
        as the model's output (finish())."""
        x = self.settle(x)
        if len(x.shape) != 1 and int(np.prod(x.shape[1:])) != 1:
            raise self.refuse(f"{'log_' if log else ''}softmax of a per-sample "
                              f"{list(x.shape)} value (only over the classes of [N, classes] "
                              f"or [N, classes, 1, 1])")
        return self._emit(Softmax(log=bool(log)), [x])

    def output(self, x: Value) -> None:
        x = self.settle(x)
        if any(i.name == x.name for i in self.g.inputs):
            # an output that is the input itself still needs a node to name it
            self.scope = ""
            x = self._emit(Identity(), [x])
        self.g.outputs.append(x.name)

    # ------------------------------------------------------------------ finishing
    def finish(self) -> Graph:
        """Fuse clamps, check softmax placement, fold, name; returns the graph."""
        g = self.g
        self._fuse_upper_clamps()
        for n in g.nodes:
            if isinstance(n.op, Softmax) and (n.name not in g.outputs or g.consumers(n.name)):
                kind = "log_softmax" if n.op.log else "softmax"
                raise self._hook(n.name)(f"{kind} that is not the model's output (Softmax/"
                                         f"LogSoftmax only as the last op)")
        with np.errstate(all="ignore"):
            simplify(g)
        for n in g.nodes:        # folding can overflow float32 (a huge scale into a weight)
            for w in op_weights(n.op).values():
                if not np.all(np.isfinite(g.weights[w])):
                    raise self._hook(n.name)(f"folding it into {n.op.kind} gives weights that "
                                             f"are not finite in float32 (NaN, Inf or beyond "
                                             f"3.4e38)")
        self._record_substitutions()
        self._name()
        return g

    def _record_substitutions(self) -> None:
        """graph.attrs['substituted']: what --substitute changed that is still in the
        graph (a SiLU inside a dropped gate went with it), '; '-separated entries
        'WHAT xCOUNT (first: SCOPE)'."""
        live = {n.name for n in self.g.nodes}
        groups: dict[str, list[str]] = {}
        for what, scope, node in self._substituted:
            if node is None or node in live:
                groups.setdefault(what, []).append(scope or "<root>")
        if groups:
            self.g.attrs["substituted"] = "; ".join(
                f"{what} x{len(scopes)} (first: {scopes[0]})" for what, scopes in groups.items())

    def _hook(self, name: str) -> Refuse:
        return self._source_of(name)[1]

    def _source_of(self, name: str) -> tuple[str, Refuse]:
        """(scope, refusal hook) of the source op that made node `name`."""
        # nodes the folding creates are named after the node they replace ('<name>.scale')
        while name not in self._origin and "." in name:
            name = name.rsplit(".", 1)[0]
        return self._origin.get(name, ("", EpcError))

    def _fuse_upper_clamps(self) -> None:
        """clip(-inf, hi) right after a ReLU or clip that nothing else reads becomes one
        clip (ReLU6 written as clamp(relu(x), max=6)); anywhere else it is refused."""
        g = self.g
        for n in list(g.nodes):
            if not (isinstance(n.op, Act) and n.op.fn.kind == "clip" and n.op.fn.lo == -np.inf):
                continue
            prev = next((p for p in g.nodes if p.name == n.inputs[0]), None)
            ok = (prev is not None and isinstance(prev.op, Act) and g.uses(prev.name) == 1
                  and prev.op.fn.kind in ("relu", "clip"))
            if ok:
                old = prev.op.fn
                lo = 0.0 if old.kind == "relu" else old.lo
                hi = n.op.fn.hi if old.kind == "relu" else min(old.hi, n.op.fn.hi)
                ok = lo < hi
            if not ok:
                raise self._hook(n.name)(f"clamp with only an upper bound {n.op.fn.hi} (only "
                                         f"right after a ReLU or a clip, as in ReLU6)")
            prev.op = Act(Activation.clip(lo, hi))
            g.nodes.remove(n)
            g.rewire(n.name, prev.name)

    def _name(self) -> None:
        """Give every node and derived weight its final name (see the module docstring)."""
        g = self.g
        scopes = {n.name: self._source_of(n.name)[0] for n in g.nodes}
        # containers: every proper prefix of a scope that holds some source op
        containers = set()
        for sc, _ in self._origin.values():
            parts = sc.split(".")
            containers.update(".".join(parts[:i]) for i in range(1, len(parts)))
        table = NameTable({i.name for i in g.inputs})
        final: dict[str, str] = {}
        producer = {n.name: n for n in g.nodes}
        for n in g.nodes:
            src = self._source_weight.get(n.name, "")
            prev = producer.get(n.inputs[0]) if n.inputs else None
            if isinstance(n.op, (Conv, Dense)) and src.endswith(".weight"):
                base = src[: -len(".weight")]
            elif isinstance(n.op, Bias) and prev is not None and isinstance(prev.op, (Conv, Dense)):
                base = final[prev.name] + "_bias"
            else:
                kind = n.op.fn.kind if isinstance(n.op, Act) else n.op.kind
                s = scopes[n.name]
                base = kind if not s else (f"{s}.{kind}" if s in containers else s)
            final[n.name] = table.unique(base)
        renamed: dict[str, str] = {}     # a weight several ops share: its first user's name
        for n in g.nodes:
            if isinstance(n.op, (Conv, Dense, Bias, ChannelScale)):
                if n.op.weight not in renamed:
                    prev = producer.get(n.inputs[0])
                    if isinstance(n.op, (Conv, Dense)):
                        base = f"{final[n.name]}.weight"
                    elif isinstance(n.op, ChannelScale):
                        base = f"{final[n.name]}.scale"
                    elif prev is not None and isinstance(prev.op, (Conv, Dense)):
                        base = f"{final[prev.name]}.bias"
                    else:
                        base = f"{final[n.name]}.bias"
                    renamed[n.op.weight] = table.unique(base)
                n.op.weight = renamed[n.op.weight]
        g.weights = {renamed.get(k, k): v for k, v in g.weights.items()}
        for n in g.nodes:
            n.name = final[n.name]
            n.inputs = [final.get(x, x) for x in n.inputs]
        g.outputs = [final.get(o, o) for o in g.outputs]


def _regroup(f: list, o: list, shape: tuple):
    """Factors f (base order) read in order o, regrouped into the axes of `shape`: a factor
    an axis boundary cuts is split in two (in base order too). (factors, order, groups), or
    None where a boundary cuts a factor unevenly."""
    f, o = list(f), list(o)
    groups, k = [], 0
    for d in shape:
        n, prod = 0, 1
        while prod < d:
            if k >= len(o):
                return None
            size = f[o[k]]
            if prod * size > d:
                if d % prod or size % (d // prod):
                    return None
                need, i = d // prod, o[k]
                f[i:i + 1] = [need, size // need]
                o = [j + 1 if j > i else j for j in o]
                o[k:k + 1] = [i, i + 1]
                size = need
            prod *= size
            k += 1
            n += 1
        if prod != d:
            return None
        groups.append(n)
    return (f, o, groups) if k == len(o) else None


def _canonical_permutation(f: list, o: list) -> tuple[list[int], list[int]]:
    """(dims, perm) of the element permutation 'f in base order, read in order o', with
    factors that stay neighbours in both orders merged (one form per permutation)."""
    merged: list[list[int]] = []          # runs of factor indices, in current order
    for i in o:
        if merged and merged[-1][-1] + 1 == i:
            merged[-1].append(i)
        else:
            merged.append([i])
    by_base = sorted(range(len(merged)), key=lambda r: merged[r][0])
    dims = [int(np.prod([f[i] for i in merged[r]])) for r in by_base]
    perm = [by_base.index(r) for r in range(len(merged))]
    return (dims or [1]), (perm or [0])


__all__ = ["Builder", "Value", "View", "SMOOTH"]
