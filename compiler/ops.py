"""The op registry: everything epc knows about each IR op, in one entry per op.

An entry is a small class (an `OpRule`) registered for its IR dataclass (compiler/ir.py)
with `@rule_for(Type)`; every consumer looks the entry up with `rule(op)` instead of
testing the op's type: the verifier and the frontends (shapes), the reference
interpreters (evaluation), the runtime's engine and kernels (forward, adjoint, contexts,
frozen max-pool winners, direct weight gradients), `epc inspect --stats` (MACs), and the
neuromorphic target (lowering to a core instruction, the instruction's assembly fields,
its integer arithmetic in the simulator and the validator's worst-case bound).

All tensors are batched torch tensors: [N, *per_sample_shape]. Linear ops have an explicit
adjoint (the tied feedback of a coupling): conv -> transposed conv, max-pool -> scatter-add
to the argmax, avg-pool -> its adjoint, flatten -> reshape back. `forward` returns the
output and a context (whatever the adjoint needs, e.g. the argmax indices); `adjoint` maps
a gradient on the output back to the input. These are the reference forms (plain torch
calls): the compiler's verifier and the bench's autograd baseline use them as they are,
the runtime's hot loop through `runtime.kernels`, which overrides a few with faster equal
kernels, and the integer simulator through each rule's `core_*` methods (float64 tensors
holding integers are exact).

Adding a linear op: its dataclass in compiler/ir.py, its rule here (shape, forward,
adjoint, MACs; `core` and `lower` if the neuromorphic core can run it), and the frontends'
mapping of the source op onto it. Nothing else dispatches on op types.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EpcError
from .ir import (Act, Activation, AdaptiveAvgPool, Add, AvgPool, BatchNorm, Bias, ChannelScale,
                 Concat, Conv, Dense, Dropout, Flatten, GlobalAvgPool, Identity, MaxPool, Pad,
                 Permute, Shape, Softmax)

Weights = Mapping[str, Any]  # name -> np.ndarray / WeightSpec / torch.Tensor


# --------------------------------------------------------------------------- helpers
def _pool_out(size: int, k: int, s: int, pb: int, pe: int, d: int, ceil: bool) -> int:
    eff = d * (k - 1) + 1
    num = size + pb + pe - eff
    out = (math.ceil(num / s) if ceil else num // s) + 1
    # PyTorch/ONNX rule: the last window must start inside the input or left padding.
    if ceil and (out - 1) * s >= size + pb:
        out -= 1
    return out


def _w(weights: Weights, name: str, like: torch.Tensor) -> torch.Tensor:
    w = weights[name]
    if isinstance(w, torch.Tensor):
        return w
    return torch.as_tensor(np.asarray(w), dtype=like.dtype, device=like.device)


def _symmetric(pads: list[int]) -> bool:
    return pads[0] == pads[2] and pads[1] == pads[3]


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-channel vector [C] to broadcast over [N, C, ...] of rank ndim."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _image_input(op, x: Shape) -> None:
    if len(x) != 3:
        raise EpcError(f"{op.kind} needs a [C, H, W] input, got {list(x)}")


def fixed_point_reciprocal(area: int) -> tuple[int, int]:
    """(rmul, rshift) with rmul / 2^rshift ~= 1 / area; exact for powers of two (how the
    core divides a window sum by its area)."""
    if area & (area - 1) == 0:
        return 1, area.bit_length() - 1
    k = 7 + math.ceil(math.log2(area))
    return int(round(2 ** k / area)), k


def conv_input(op: Conv, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The tensor a convolution reads and the symmetric padding F.conv2d applies to it
    (asymmetric padding is applied here, with zeros, so the conv itself pads nothing)."""
    if _symmetric(op.pads):
        return x, (op.pads[0], op.pads[1])
    return F.pad(x, (op.pads[1], op.pads[3], op.pads[0], op.pads[2])), (0, 0)


def maxpool_input(op: MaxPool, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The tensor a max-pool scans and the symmetric padding F.max_pool2d applies to it
    (asymmetric padding is applied here, with -inf, so the pool itself pads nothing)."""
    if _symmetric(op.pads):
        return x, (op.pads[0], op.pads[1])
    return F.pad(x, (op.pads[1], op.pads[3], op.pads[0], op.pads[2]), value=-math.inf), (0, 0)


# --------------------------------------------------------------------------- rule types
@dataclass(frozen=True)
class CoreOp:
    """A neuromorphic core instruction (a synapse chain stage, `isa.SynOp`): its name and
    its fields in assembly order, each (key, SynOp attribute, form); form: 'name' (a
    memory), 'int', 'flag' (0/1), n (n comma-separated integers) or 'ints' (one or more
    comma-separated integers). `w`/`e` name the
    weight's mantissa and exponent memories of a weighted instruction."""

    kind: str
    fields: tuple[tuple[str, str, Any], ...] = ()

    @property
    def weighted(self) -> bool:
        return any(attr == "w" for _, attr, _ in self.fields)

    def has(self, attr: str) -> bool:
        return any(a == attr for _, a, _ in self.fields)


WEIGHT_FIELDS = (("w", "w", "name"), ("e", "e", "name"))


class OpRule:
    """What one IR op type means. Subclasses override what applies to their op."""

    op_type: type = type(None)   # set by @rule_for
    linear = False
    many_inputs = False          # takes one or more inputs (add, concat), else exactly one

    def shape(self, op, in_shapes: list[Shape], weights: Weights) -> Shape:
        """Per-sample output shape for inputs of `in_shapes`; raises EpcError."""
        raise EpcError(f"no shape rule for op {type(op).__name__}")

    def evaluate(self, op, xs: list[torch.Tensor], weights: Weights) -> torch.Tensor:
        """The op in the feedforward reference interpreter."""
        raise EpcError(f"no evaluation rule for op {type(op).__name__}")

    def macs(self, op, in_shape: Shape, out_shape: Shape, weights: Weights) -> int:
        """Multiply-accumulates per sample of one forward application (for --stats)."""
        return 0

    def forward(self, op, x: torch.Tensor, weights: Weights) -> tuple[torch.Tensor, Any]:
        """Apply the op to a batch: (y, ctx), ctx being what `adjoint` needs."""
        raise EpcError(f"op {op.kind} is not a linear op")

    def adjoint(self, op, g: torch.Tensor, ctx: Any, weights: Weights) -> torch.Tensor:
        """The transpose of `forward` at the point that produced `ctx`, applied to g."""
        raise EpcError(f"op {op.kind} is not a linear op")


class LinearRule(OpRule):
    """An op that may sit in a coupling chain: a linear map with an explicit adjoint."""

    linear = True
    # the adjoint depends on the input's values, not only its shape (a max-pool's winners):
    # contexts are cached per source value, and the selection can be frozen
    piecewise = False
    # the adjoint's context holds the input tensor itself, so contexts come from running
    # `forward` (else `shape_context` builds them from the input's shape)
    context_needs_input = False
    core: CoreOp | None = None   # the core instruction it lowers to (None: not on the core)
    # `weight_grad(op, x, g, weights)`: dPhi/dW of the op's one weight from its input x and
    # the gradient g on its output, for ops with a direct form (None: autograd)
    weight_grad: Callable | None = None
    # the op treats every channel (axis 0) alike and alone, so it commutes with a pad or
    # crop of the channels (to_energy pools each part of a concatenation before placing it)
    channelwise = False

    def evaluate(self, op, xs, weights):
        return self.forward(op, xs[0], weights)[0]

    def unsupported(self, op) -> str | None:
        """Which of this op's settings `forward` cannot run (None: it runs them all)."""
        return None

    def is_channelwise(self, op) -> bool:
        """Whether this op (with its settings) is `channelwise`."""
        return self.channelwise

    def shape_context(self, op, shape) -> Any:
        """The adjoint's context for a batched input of `shape` (when not
        `context_needs_input`): most adjoints need the input shape or nothing."""
        return None

    # ---- frozen selections (piecewise ops)
    def freeze(self, op, ctx):
        """The selection in force at a forward's context (what `forward_frozen` replays)."""
        raise EpcError(f"op {op.kind} has no selection to freeze")

    def forward_frozen(self, op, x: torch.Tensor, frozen) -> tuple[torch.Tensor, Any]:
        raise EpcError(f"op {op.kind} has no selection to freeze")

    def frozen_context(self, op, shape, frozen, dtype) -> Any:
        """The adjoint's context for a batched input of `shape` under a frozen selection."""
        raise EpcError(f"op {op.kind} has no selection to freeze")

    @staticmethod
    def take_frozen(frozen, take):
        """A frozen selection with `take` applied to its batch rows."""
        return take(frozen)

    # ---- the neuromorphic core
    def lower(self, op, in_shape: Shape, where: str) -> dict:
        """The core instruction's fields (SynOp keyword arguments, without the weight's
        `w`/`e` memories); raises EpcError for what the core cannot express."""
        return {"kind": self.core.kind}

    def from_core(self, syn) -> Any:
        """The IR op an instruction executes as (weights named by their memories)."""
        raise NotImplementedError

    def core_forward(self, op, x, weights):
        """The integer core's form (exact on integers held in float64)."""
        return self.forward(op, x, weights)

    def core_adjoint(self, op, g, ctx, weights):
        return self.adjoint(op, g, ctx, weights)

    def core_shape_context(self, op, shape):
        return self.shape_context(op, shape)

    def core_synops(self, op, in_shape: Shape, out_shape: Shape, weights: Weights) -> int:
        """Synaptic operations per sample of one application on the core."""
        return self.macs(op, in_shape, out_shape, weights)

    def core_adjoint_bound(self, op, g, ctx, weights):
        """A bound on |core_adjoint| for a non-negative g and |weights| (the validator's
        worst-case accumulator)."""
        return self.core_adjoint(op, g, ctx, weights)


RULES: dict[type, OpRule] = {}
CORE_RULES: dict[str, LinearRule] = {}     # core instruction name -> rule


def rule_for(op_type: type):
    """Register the decorated OpRule class as the rule of IR op type `op_type`."""
    def deco(cls):
        r = cls()
        r.op_type = op_type
        if r.linear != op_type.linear:
            raise TypeError(f"{cls.__name__}: linear={r.linear}, but {op_type.__name__} "
                            f"says {op_type.linear}")
        RULES[op_type] = r
        if getattr(r, "core", None) is not None:
            CORE_RULES[r.core.kind] = r
        return cls
    return deco


def rule(op) -> OpRule:
    """The registry entry of an IR op (EpcError for an unregistered type)."""
    try:
        return RULES[type(op)]
    except KeyError:
        raise EpcError(f"op {type(op).__name__} has no entry in the op registry") from None


def core_rule(kind: str) -> LinearRule | None:
    """The rule behind core instruction `kind` (None: not an instruction)."""
    return CORE_RULES.get(kind)


def core_op(syn) -> tuple[LinearRule, Any]:
    """(rule, IR op) that a core instruction (`isa.SynOp`) executes as."""
    r = CORE_RULES.get(syn.kind)
    if r is None:
        raise EpcError(f"unknown synapse op {syn.kind}")
    return r, r.from_core(syn)


# --------------------------------------------------------------------------- linear ops
def _dense_weight_grad(op, x, g, weights):
    return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


@rule_for(Dense)
class DenseRule(LinearRule):
    core = CoreOp("dense", WEIGHT_FIELDS)
    weight_grad = staticmethod(_dense_weight_grad)

    def shape(self, op, in_shapes, weights):
        x, w = tuple(in_shapes[0]), tuple(weights[op.weight].shape)
        if len(x) != 1 or len(w) != 2 or w[1] != x[0]:
            raise EpcError(f"dense weight {op.weight} {list(w)} does not apply to input {list(x)}")
        return (w[0],)

    def forward(self, op, x, weights):
        return x @ _w(weights, op.weight, x).t(), None

    def adjoint(self, op, g, ctx, weights):
        return g @ _w(weights, op.weight, g)

    def macs(self, op, in_shape, out_shape, weights):
        return int(np.prod(weights[op.weight].shape))

    def from_core(self, syn):
        return Dense(syn.w)


def _conv_weight_grad(op, x, g, weights):
    # a Conv is 2-D (compiler.ir) and its input batched: x is [N, C, H, W]
    x, pad = conv_input(op, x)
    return torch.nn.grad.conv2d_weight(x, weights[op.weight].shape, g, op.stride, pad,
                                       op.dilation, op.groups)


@rule_for(Conv)
class ConvRule(LinearRule):
    core = CoreOp("conv", WEIGHT_FIELDS + (("s", "stride", 2), ("p", "pads", 4),
                                           ("d", "dilation", 2), ("g", "groups", "int")))
    weight_grad = staticmethod(_conv_weight_grad)

    def shape(self, op, in_shapes, weights):
        x, w = tuple(in_shapes[0]), tuple(weights[op.weight].shape)
        if len(x) != 3 or len(w) != 4 or w[1] * op.groups != x[0] or w[0] % op.groups:
            raise EpcError(f"conv weight {op.weight} {list(w)} (groups={op.groups}) does not "
                           f"apply to input {list(x)}")
        hs = [_pool_out(x[1 + i], w[2 + i], op.stride[i], op.pads[i], op.pads[2 + i],
                        op.dilation[i], False) for i in range(2)]
        return (w[0], *hs)

    def forward(self, op, x, weights):
        xp, pad = conv_input(op, x)
        return (F.conv2d(xp, _w(weights, op.weight, x), None, op.stride, pad, op.dilation,
                         op.groups), x.shape)

    def adjoint(self, op, g, ctx, weights):
        w = _w(weights, op.weight, g)
        in_shape = ctx
        if _symmetric(op.pads):
            return torch.nn.grad.conv2d_input(in_shape, w, g, op.stride,
                                              (op.pads[0], op.pads[1]), op.dilation, op.groups)
        ph, pw = in_shape[2] + op.pads[0] + op.pads[2], in_shape[3] + op.pads[1] + op.pads[3]
        gp = torch.nn.grad.conv2d_input((in_shape[0], in_shape[1], ph, pw), w, g, op.stride, 0,
                                        op.dilation, op.groups)
        return gp[:, :, op.pads[0]:op.pads[0] + in_shape[2], op.pads[1]:op.pads[1] + in_shape[3]]

    def shape_context(self, op, shape):
        return shape

    def macs(self, op, in_shape, out_shape, weights):
        return int(np.prod(out_shape)) * int(np.prod(weights[op.weight].shape[1:]))

    def lower(self, op, in_shape, where):
        return {"kind": "conv", "stride": tuple(op.stride), "pads": tuple(op.pads),
                "dilation": tuple(op.dilation), "groups": int(op.groups)}

    def from_core(self, syn):
        return Conv(syn.w, list(syn.stride), list(syn.pads), list(syn.dilation), syn.groups)


@rule_for(MaxPool)
class MaxPoolRule(LinearRule):
    piecewise = True
    channelwise = True
    context_needs_input = True
    core = CoreOp("maxpool", (("k", "kernel", 2), ("s", "stride", 2), ("p", "pads", 4),
                              ("d", "dilation", 2), ("ceil", "ceil", "flag")))

    def shape(self, op, in_shapes, weights):
        x = tuple(in_shapes[0])
        _image_input(op, x)
        hs = [_pool_out(x[1 + i], op.kernel[i], op.stride[i], op.pads[i], op.pads[2 + i],
                        op.dilation[i], op.ceil_mode) for i in range(2)]
        return (x[0], *hs)

    def forward(self, op, x, weights):
        xp, pad = maxpool_input(op, x)
        y, idx = F.max_pool2d(xp, op.kernel, op.stride, pad, op.dilation, op.ceil_mode,
                              return_indices=True)
        return y, (xp, idx, pad)

    def adjoint(self, op, g, ctx, weights):
        xp, idx, pad = ctx
        gx = torch.ops.aten.max_pool2d_with_indices_backward(
            g, xp, op.kernel, op.stride, list(pad), op.dilation, op.ceil_mode, idx)
        if not _symmetric(op.pads):
            h, w = xp.shape[2] - op.pads[0] - op.pads[2], xp.shape[3] - op.pads[1] - op.pads[3]
            gx = gx[:, :, op.pads[0]:op.pads[0] + h, op.pads[1]:op.pads[1] + w]
        return gx

    def macs(self, op, in_shape, out_shape, weights):
        return int(np.prod(out_shape)) * int(np.prod(op.kernel))

    def lower(self, op, in_shape, where):
        return {"kind": "maxpool", "kernel": tuple(op.kernel), "stride": tuple(op.stride),
                "pads": tuple(op.pads), "dilation": tuple(op.dilation),
                "ceil": bool(op.ceil_mode)}

    # the frozen selection is the argmax indices (torch's max_pool2d ones: into the input
    # plane, or into the -inf padded plane for asymmetric padding)
    def freeze(self, op, ctx):
        return ctx[1]

    def forward_frozen(self, op, x, idx):
        """The value at each window's recorded index (a linear map)."""
        xp, pad = maxpool_input(op, x)
        y = xp.flatten(2).gather(2, idx.flatten(2)).reshape(idx.shape)
        return y, (xp, idx, pad)

    def frozen_context(self, op, shape, idx, dtype):
        # the adjoint reads only the (padded) input's shape and the indices
        pt, pl, pb, pr = op.pads
        sym = _symmetric(op.pads)
        xshape = shape if sym else (*shape[:2], shape[2] + pt + pb, shape[3] + pl + pr)
        return torch.zeros(xshape, dtype=dtype), idx, (pt, pl) if sym else (0, 0)

    def from_core(self, syn):
        return MaxPool(list(syn.kernel), list(syn.stride), list(syn.pads), list(syn.dilation),
                       syn.ceil)

    def core_synops(self, op, in_shape, out_shape, weights):
        return 0    # comparisons, no multiply-accumulates

    def core_adjoint_bound(self, op, g, ctx, weights):
        # the argmax routing may concentrate every window on one element
        k = op.kernel[0] * op.kernel[1]
        return self.core_adjoint(op, g, ctx, weights) * 0 + float(g.max()) * k


def _pool_divisor(where: str, op: AvgPool, in_shape) -> int:
    """The one constant the core divides an average pool's window sums by."""
    kh, kw = op.kernel
    if any(op.pads) and not op.count_include_pad:
        raise EpcError(f"{where}: average pool with padding that excludes the pad from the "
                       f"count has a position-dependent divisor; the core divides by one "
                       f"constant (use count_include_pad or no padding)")
    if op.ceil_mode:
        for i in range(2):
            size = in_shape[1 + i] + op.pads[i] + op.pads[2 + i]
            out = _pool_out(in_shape[1 + i], op.kernel[i], op.stride[i], op.pads[i],
                            op.pads[2 + i], 1, True)
            if (out - 1) * op.stride[i] + op.kernel[i] > size:
                raise EpcError(f"{where}: average pool with ceil_mode has partial windows "
                               f"(position-dependent divisor); not supported on the core")
    return kh * kw


@rule_for(AvgPool)
class AvgPoolRule(LinearRule):
    """On the core an average pool is a window sum (`sumpool`) whose division by the
    window area is the chain's final multiply-and-shift (rmul, rshift)."""

    context_needs_input = True   # avg_pool2d_backward takes the input (for its shape)
    channelwise = True
    core = CoreOp("sumpool", (("k", "kernel", 2), ("s", "stride", 2), ("p", "pads", 4),
                              ("ceil", "ceil", "flag"), ("rmul", "rmul", "int"),
                              ("rshift", "rshift", "int")))

    def shape(self, op, in_shapes, weights):
        x = tuple(in_shapes[0])
        _image_input(op, x)
        hs = [_pool_out(x[1 + i], op.kernel[i], op.stride[i], op.pads[i], op.pads[2 + i],
                        1, op.ceil_mode) for i in range(2)]
        return (x[0], *hs)

    def forward(self, op, x, weights):
        if _symmetric(op.pads):
            y = F.avg_pool2d(x, op.kernel, op.stride, (op.pads[0], op.pads[1]), op.ceil_mode,
                             op.count_include_pad)
            return y, x
        # asymmetric padding (F.avg_pool2d pads both sides alike): the window sums of the
        # explicitly padded input over the number of counted elements in each window
        xp, count = self._asymmetric(op, x)
        y = F.avg_pool2d(xp, op.kernel, op.stride, 0, op.ceil_mode, True, 1)
        return y / count, x

    def adjoint(self, op, g, ctx, weights):
        x = ctx
        if _symmetric(op.pads):
            return torch.ops.aten.avg_pool2d_backward(
                g, x, op.kernel, op.stride, [op.pads[0], op.pads[1]], op.ceil_mode,
                op.count_include_pad, None)
        xp, count = self._asymmetric(op, x)
        gp = torch.ops.aten.avg_pool2d_backward(g / count, xp, op.kernel, op.stride, [0, 0],
                                                op.ceil_mode, True, 1)
        h, w = x.shape[2], x.shape[3]
        return gp[:, :, op.pads[0]:op.pads[0] + h, op.pads[1]:op.pads[1] + w]

    def _asymmetric(self, op, x):
        """The padded input and each window's divisor (the elements it counts: the padded
        ones too with count_include_pad, never those past the padded plane)."""
        pt, pl, pb, pr = op.pads
        xp = F.pad(x, (pl, pr, pt, pb))
        plane = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        counted = F.pad(plane, (pl, pr, pt, pb), value=1.0 if op.count_include_pad else 0.0)
        count = F.avg_pool2d(counted, op.kernel, op.stride, 0, op.ceil_mode, True, 1)
        return xp, count

    def macs(self, op, in_shape, out_shape, weights):
        return int(np.prod(out_shape)) * int(np.prod(op.kernel))

    def lower(self, op, in_shape, where):
        if not _symmetric(op.pads):
            raise EpcError(f"{where}: average pool with asymmetric padding is not "
                           f"supported on the core")
        rm, rs = fixed_point_reciprocal(_pool_divisor(where, op, in_shape))
        return {"kind": "sumpool", "kernel": tuple(op.kernel), "stride": tuple(op.stride),
                "pads": tuple(op.pads), "ceil": bool(op.ceil_mode), "rmul": rm, "rshift": rs}

    def from_core(self, syn):
        return AvgPool(list(syn.kernel), list(syn.stride), list(syn.pads), True, syn.ceil)

    # the core's window sum: an average pool counting the padding, divisor 1
    def core_forward(self, op, x, weights):
        y = F.avg_pool2d(x, op.kernel, op.stride, [op.pads[0], op.pads[1]], op.ceil_mode,
                         True, 1)
        return y, x.shape

    def core_adjoint(self, op, g, ctx, weights):
        x = torch.zeros(ctx, dtype=g.dtype)
        return torch.ops.aten.avg_pool2d_backward(g, x, op.kernel, op.stride,
                                                  [op.pads[0], op.pads[1]], op.ceil_mode,
                                                  True, 1)

    def core_shape_context(self, op, shape):
        return shape

    def core_synops(self, op, in_shape, out_shape, weights):
        return int(np.prod(in_shape))


@rule_for(GlobalAvgPool)
class GlobalAvgPoolRule(LinearRule):
    """On the core: a sum over the plane (`gsum`), divided by the chain's rmul/rshift."""

    channelwise = True
    core = CoreOp("gsum", (("keep", "keepdims", "flag"), ("rmul", "rmul", "int"),
                           ("rshift", "rshift", "int")))

    def shape(self, op, in_shapes, weights):
        x = tuple(in_shapes[0])
        if len(x) != 3:
            raise EpcError(f"global average pool needs a [C, H, W] input, got {list(x)}")
        return (x[0], 1, 1) if op.keepdims else (x[0],)

    def forward(self, op, x, weights):
        return x.mean(dim=(2, 3), keepdim=op.keepdims), x.shape

    def adjoint(self, op, g, ctx, weights):
        n, c, h, w = ctx
        return (g.reshape(n, c, 1, 1) / (h * w)).expand(n, c, h, w)

    def shape_context(self, op, shape):
        return shape

    def macs(self, op, in_shape, out_shape, weights):
        return int(np.prod(in_shape))

    def lower(self, op, in_shape, where):
        rm, rs = fixed_point_reciprocal(int(in_shape[1] * in_shape[2]))
        return {"kind": "gsum", "keepdims": bool(op.keepdims), "rmul": rm, "rshift": rs}

    def from_core(self, syn):
        return GlobalAvgPool(syn.keepdims)

    def core_forward(self, op, x, weights):
        return x.sum(dim=(2, 3), keepdim=op.keepdims), x.shape

    def core_adjoint(self, op, g, ctx, weights):
        n, c, h, w = ctx
        return g.reshape(n, c, 1, 1).expand(n, c, h, w)


@rule_for(Flatten)
class FlattenRule(LinearRule):
    core = CoreOp("flatten")

    def shape(self, op, in_shapes, weights):
        return (int(np.prod(tuple(in_shapes[0]))),)

    def forward(self, op, x, weights):
        return x.reshape(x.shape[0], -1), x.shape

    def adjoint(self, op, g, ctx, weights):
        return g.reshape(ctx)

    def shape_context(self, op, shape):
        return shape

    def from_core(self, syn):
        return Flatten()


@rule_for(Identity)
class IdentityRule(LinearRule):
    channelwise = True
    core = CoreOp("identity")

    def shape(self, op, in_shapes, weights):
        return tuple(in_shapes[0])

    def forward(self, op, x, weights):
        return x, None

    def adjoint(self, op, g, ctx, weights):
        return g

    def from_core(self, syn):
        return Identity()


@rule_for(ChannelScale)
class ChannelScaleRule(LinearRule):
    core = CoreOp("chscale", WEIGHT_FIELDS)

    def shape(self, op, in_shapes, weights):
        return tuple(in_shapes[0])

    def forward(self, op, x, weights):
        return x * _channel_view(_w(weights, op.weight, x), x.dim()), None

    def adjoint(self, op, g, ctx, weights):
        return g * _channel_view(_w(weights, op.weight, g), g.dim())

    def macs(self, op, in_shape, out_shape, weights):
        return int(np.prod(in_shape))

    def from_core(self, syn):
        return ChannelScale(syn.w)


def torch_pads(pads, rank: int) -> list[int]:
    """ONNX-ordered pads [b_0..b_{r-1}, e_0..e_{r-1}] of a per-sample value of `rank` in
    F.pad's order (last axis first: b_{r-1}, e_{r-1}, ..., b_0, e_0)."""
    out: list[int] = []
    for i in reversed(range(rank)):
        out += [int(pads[i]), int(pads[rank + i])]
    return out


@rule_for(Pad)
class PadRule(LinearRule):
    """Zero padding (positive entries) and cropping (negative ones) per axis; the adjoint
    is the opposite pad, so a crop's transpose puts the gradient back with zeros around
    it. On the core: data movement, no arithmetic."""

    core = CoreOp("pad", (("p", "edges", "ints"),))

    def shape(self, op, in_shapes, weights):
        x = tuple(in_shapes[0])
        r = len(x)
        if len(op.pads) != 2 * r:
            raise EpcError(f"pad {list(op.pads)} needs {2 * r} entries (begin and end of each "
                           f"axis) for a per-sample {list(x)} value")
        out = tuple(int(d) + int(op.pads[i]) + int(op.pads[r + i]) for i, d in enumerate(x))
        if any(o <= 0 for o in out):
            raise EpcError(f"pad {list(op.pads)} leaves nothing of a per-sample {list(x)} value")
        return out

    def is_channelwise(self, op):
        r = len(op.pads) // 2
        return op.pads[0] == 0 and op.pads[r] == 0

    def forward(self, op, x, weights):
        return F.pad(x, torch_pads(op.pads, x.dim() - 1)), None

    def adjoint(self, op, g, ctx, weights):
        return F.pad(g, [-p for p in torch_pads(op.pads, g.dim() - 1)])

    def lower(self, op, in_shape, where):
        return {"kind": "pad", "edges": tuple(int(p) for p in op.pads)}

    def from_core(self, syn):
        return Pad(list(syn.edges))


@rule_for(Permute)
class PermuteRule(LinearRule):
    """reshape(dims) -> transpose(perm) -> reshape(shape); the adjoint runs the inverse
    permutation. On the core: data movement, no arithmetic."""

    core = CoreOp("permute", (("d", "dims", "ints"), ("p", "perm", "ints"),
                              ("o", "out", "ints")))

    def shape(self, op, in_shapes, weights):
        x = tuple(in_shapes[0])
        n = int(np.prod(x))
        dims, perm, shape = list(op.dims), list(op.perm), list(op.shape)
        if sorted(perm) != list(range(len(dims))) or any(d <= 0 for d in dims + shape) \
                or int(np.prod(dims)) != n or int(np.prod(shape)) != n:
            raise EpcError(f"permute dims={dims} perm={perm} shape={shape} does not apply to a "
                           f"per-sample {list(x)} value")
        return tuple(int(d) for d in shape)

    def forward(self, op, x, weights):
        n = x.shape[0]
        y = x.reshape(n, *op.dims).permute(0, *(p + 1 for p in op.perm))
        return y.reshape(n, *op.shape), tuple(x.shape)

    def adjoint(self, op, g, ctx, weights):
        n = g.shape[0]
        inv = np.argsort(op.perm)
        t = g.reshape(n, *(op.dims[p] for p in op.perm)).permute(0, *(int(i) + 1 for i in inv))
        return t.reshape(n, *ctx[1:])

    def shape_context(self, op, shape):
        return tuple(shape)

    def lower(self, op, in_shape, where):
        return {"kind": "permute", "dims": tuple(op.dims), "perm": tuple(op.perm),
                "out": tuple(op.shape)}

    def from_core(self, syn):
        return Permute(list(syn.dims), list(syn.perm), list(syn.out))


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows [start, end) of `out` outputs over `size` inputs."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _adaptive_matrix(size: int, out: int, scale: int | None, like: torch.Tensor):
    """[out, size] window matrix: 1/len per window (scale None), or scale/len (integers:
    the core's form, scale a multiple of every window length)."""
    a = torch.zeros(out, size, dtype=like.dtype, device=like.device)
    for i, (lo, hi) in enumerate(adaptive_windows(size, out)):
        a[i, lo:hi] = 1.0 / (hi - lo) if scale is None else scale // (hi - lo)
    return a


def _window_lcm(size: int, out: int) -> int:
    return math.lcm(*(hi - lo for lo, hi in adaptive_windows(size, out)))


@rule_for(AdaptiveAvgPool)
class AdaptiveAvgPoolRule(LinearRule):
    """On the core (`apool`): each window sum times the integer L / len (L the least common
    multiple of the window lengths along that axis), and the chain's rmul/rshift divides
    by L_h * L_w: windows of unequal size with one constant divisor, exact up to the
    chain's final rounding (as a sum pool's)."""

    channelwise = True
    core = CoreOp("apool", (("o", "out", 2), ("rmul", "rmul", "int"),
                            ("rshift", "rshift", "int")))

    def shape(self, op, in_shapes, weights):
        x = tuple(in_shapes[0])
        _image_input(op, x)
        if len(op.out) != 2 or any(int(o) <= 0 for o in op.out):
            raise EpcError(f"adaptive average pool to {list(op.out)}: needs two positive sizes")
        return (x[0], int(op.out[0]), int(op.out[1]))

    def forward(self, op, x, weights):
        return F.adaptive_avg_pool2d(x, tuple(op.out)), tuple(x.shape)

    def adjoint(self, op, g, ctx, weights):
        ah = _adaptive_matrix(ctx[2], op.out[0], None, g)
        aw = _adaptive_matrix(ctx[3], op.out[1], None, g)
        return torch.einsum("ih,ncij,jw->nchw", ah, g, aw)

    def shape_context(self, op, shape):
        return tuple(shape)

    def macs(self, op, in_shape, out_shape, weights):
        c, h, w = in_shape
        span = [max(hi - lo for lo, hi in adaptive_windows(s, o))
                for s, o in zip((h, w), op.out)]
        return int(c * op.out[0] * op.out[1] * span[0] * span[1])

    def lower(self, op, in_shape, where):
        lcm = _window_lcm(in_shape[1], op.out[0]) * _window_lcm(in_shape[2], op.out[1])
        if lcm > (1 << 12):
            raise EpcError(f"{where}: adaptive average pool from {list(in_shape[1:])} to "
                           f"{list(op.out)}: its window lengths need a common divisor of "
                           f"{lcm} (the core allows up to {1 << 12})")
        rm, rs = fixed_point_reciprocal(lcm)
        return {"kind": "apool", "out": tuple(int(o) for o in op.out), "rmul": rm,
                "rshift": rs}

    def from_core(self, syn):
        return AdaptiveAvgPool(list(syn.out))

    def _core_mats(self, op, shape, like):
        h, w = shape[2], shape[3]
        return (_adaptive_matrix(h, op.out[0], _window_lcm(h, op.out[0]), like),
                _adaptive_matrix(w, op.out[1], _window_lcm(w, op.out[1]), like))

    def core_forward(self, op, x, weights):
        ah, aw = self._core_mats(op, x.shape, x)
        return torch.einsum("ih,nchw,jw->ncij", ah, x, aw), tuple(x.shape)

    def core_adjoint(self, op, g, ctx, weights):
        ah, aw = self._core_mats(op, ctx, g)
        return torch.einsum("ih,ncij,jw->nchw", ah, g, aw)

    def core_synops(self, op, in_shape, out_shape, weights):
        return self.macs(op, in_shape, out_shape, weights)


# --------------------------------------------------------------------------- ff-only ops
# canonicalize / to_energy remove or absorb all of these; they have shapes and a
# reference evaluation, no coupling form.
class _SameShape(OpRule):
    def shape(self, op, in_shapes, weights):
        return tuple(in_shapes[0]) if in_shapes else ()


@rule_for(Bias)
class BiasRule(_SameShape):
    def evaluate(self, op, xs, weights):
        return xs[0] + _w(weights, op.weight, xs[0])


@rule_for(BatchNorm)
class BatchNormRule(_SameShape):
    def evaluate(self, op, xs, weights):
        x = xs[0]
        sc, sh = _w(weights, op.scale, x), _w(weights, op.shift, x)
        mu, var = _w(weights, op.mean, x), _w(weights, op.var, x)
        k = sc / torch.sqrt(var + op.epsilon)
        return x * _channel_view(k, x.dim()) + _channel_view(sh - mu * k, x.dim())


@rule_for(Act)
class ActRule(_SameShape):
    def evaluate(self, op, xs, weights):
        return activate(op.fn, xs[0])


@rule_for(Add)
class AddRule(OpRule):
    many_inputs = True

    def shape(self, op, in_shapes, weights):
        shapes = {tuple(s) for s in in_shapes}
        if len(shapes) != 1:
            raise EpcError(f"add of differently shaped inputs {sorted(shapes)}")
        return tuple(in_shapes[0])

    def evaluate(self, op, xs, weights):
        out = xs[0]
        for y in xs[1:]:
            out = out + y
        return out


@rule_for(Concat)
class ConcatRule(OpRule):
    many_inputs = True

    def shape(self, op, in_shapes, weights):
        shapes = [tuple(s) for s in in_shapes]
        r = len(shapes[0]) if shapes else 0
        if not shapes or not 0 <= op.axis < r or any(len(s) != r for s in shapes) or \
                len({s[:op.axis] + s[op.axis + 1:] for s in shapes}) != 1:
            raise EpcError(f"concat along per-sample axis {op.axis} of {[list(s) for s in shapes]}"
                           f" (all other dimensions must agree)")
        out = list(shapes[0])
        out[op.axis] = sum(s[op.axis] for s in shapes)
        return tuple(out)

    def evaluate(self, op, xs, weights):
        return torch.cat(xs, dim=op.axis + 1)


@rule_for(Dropout)
class DropoutRule(_SameShape):
    def evaluate(self, op, xs, weights):
        return xs[0]


@rule_for(Softmax)
class SoftmaxRule(_SameShape):
    def evaluate(self, op, xs, weights):
        x = xs[0]
        return torch.log_softmax(x, dim=1) if op.log else torch.softmax(x, dim=1)


# --------------------------------------------------------------------------- by op
def out_shape(op, in_shapes: list[Shape], weights: Weights) -> Shape:
    """Per-sample output shape of `op` applied to inputs of `in_shapes`; raises EpcError."""
    return tuple(rule(op).shape(op, in_shapes, weights))


def forward(op, x: torch.Tensor, weights: Weights) -> tuple[torch.Tensor, Any]:
    """Apply a linear op to a batch. Returns (y, ctx) where ctx feeds `adjoint`."""
    return rule(op).forward(op, x, weights)


def adjoint(op, g: torch.Tensor, ctx: Any, weights: Weights) -> torch.Tensor:
    """The transpose of `forward` at the point that produced `ctx`, applied to g."""
    return rule(op).adjoint(op, g, ctx, weights)


def chain_forward(ops: list, x: torch.Tensor, weights: Weights) -> tuple[torch.Tensor, list]:
    """Apply a coupling's op chain; returns (y, contexts) for `chain_adjoint`."""
    ctxs = []
    for op in ops:
        x, ctx = rule(op).forward(op, x, weights)
        ctxs.append(ctx)
    return x, ctxs


def chain_adjoint(ops: list, g: torch.Tensor, ctxs: list, weights: Weights) -> torch.Tensor:
    for op, ctx in zip(reversed(ops), reversed(ctxs)):
        g = rule(op).adjoint(op, g, ctx, weights)
    return g


def apply_node_op(op, xs: list[torch.Tensor], weights: Weights) -> torch.Tensor:
    """Evaluate any feedforward op (the reference interpreter of the feedforward form)."""
    return rule(op).evaluate(op, xs, weights)


def macs(op, in_shape: Shape, out_shape_: Shape, weights: Weights) -> int:
    """Multiply-accumulates per sample of one forward application (for --stats)."""
    return rule(op).macs(op, in_shape, out_shape_, weights)


def chain_macs(ops: list, in_shape: Shape, weights: Weights) -> list[int]:
    """Multiply-accumulates per sample of each op of a coupling's chain, applied forward
    from a source of `in_shape`."""
    out = []
    for op in ops:
        nxt = out_shape(op, [in_shape], weights)
        out.append(macs(op, in_shape, nxt, weights))
        in_shape = nxt
    return out


# --------------------------------------------------------------------------- activations
def activate(act: Activation, u: torch.Tensor) -> torch.Tensor:
    if act.kind == "identity":
        return u
    if act.kind == "relu":
        return torch.relu(u)
    if act.kind == "clip":
        return torch.clamp(u, act.lo, act.hi)
    if act.kind == "hardsigmoid":
        return torch.clamp(act.alpha * u + act.beta, 0.0, 1.0)
    raise EpcError(f"unknown activation {act.kind}")


def activate_(act: Activation, u: torch.Tensor) -> torch.Tensor:
    """`activate` in place on u (the same arithmetic); returns u."""
    if act.kind == "identity":
        return u
    if act.kind == "relu":
        return u.relu_()
    if act.kind == "clip":
        return u.clamp_(act.lo, act.hi)
    if act.kind == "hardsigmoid":
        return u.mul_(act.alpha).add_(act.beta).clamp_(0.0, 1.0)
    raise EpcError(f"unknown activation {act.kind}")


def lift_bounds(act: Activation) -> Activation:
    """The activation with its upper bound removed (clip(0, c) -> relu); for --verify."""
    if act.kind == "clip" and act.lo == 0.0:
        return Activation.relu()
    return act


ActivationFn = Callable[[torch.Tensor], torch.Tensor]


def reduce_to_shape(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Sum a batched tensor [N, *s] down to a bias shape that broadcasts to s (the adjoint
    of broadcasting a bias: the runtime's bias gradient, the quantizer's bias correction)."""
    x = x.sum(0)
    lead = x.dim() - len(shape)
    if lead > 0:
        x = x.sum(tuple(range(lead)))
    dims = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
    if dims:
        x = x.sum(dims, keepdim=True)
    return x.reshape(shape)
