"""The op vocabulary: shape inference, forward and adjoint for every IR op.

All tensors are batched torch tensors: [N, *per_sample_shape]. Linear ops have an explicit
adjoint (the tied feedback of a coupling): conv -> transposed conv, max-pool -> scatter-add
to the argmax, avg-pool -> its adjoint, flatten -> reshape back. `forward` returns the
output and a context (whatever the adjoint needs, e.g. the argmax indices); `adjoint` maps
a gradient on the output back to the input. The runtime's hot loop and the integer
simulator (float64 tensors holding integers are exact) both use these.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EpcError
from .ir import (Act, Activation, Add, AvgPool, BatchNorm, Bias, ChannelScale, Conv, Dense,
                 Dropout, Flatten, GlobalAvgPool, Identity, MaxPool, Shape, Softmax)

Weights = Mapping[str, Any]  # name -> np.ndarray / WeightSpec / torch.Tensor


# --------------------------------------------------------------------------- shapes
def _pool_out(size: int, k: int, s: int, pb: int, pe: int, d: int, ceil: bool) -> int:
    eff = d * (k - 1) + 1
    num = size + pb + pe - eff
    out = (math.ceil(num / s) if ceil else num // s) + 1
    # PyTorch/ONNX rule: the last window must start inside the input or left padding.
    if ceil and (out - 1) * s >= size + pb:
        out -= 1
    return out


def out_shape(op, in_shapes: list[Shape], weights: Weights) -> Shape:
    """Per-sample output shape of `op` applied to inputs of `in_shapes`; raises EpcError."""
    x = tuple(in_shapes[0]) if in_shapes else ()
    if isinstance(op, Dense):
        w = tuple(weights[op.weight].shape)
        if len(x) != 1 or len(w) != 2 or w[1] != x[0]:
            raise EpcError(f"dense weight {op.weight} {list(w)} does not apply to input {list(x)}")
        return (w[0],)
    if isinstance(op, Conv):
        w = tuple(weights[op.weight].shape)
        if len(x) != 3 or len(w) != 4 or w[1] * op.groups != x[0] or w[0] % op.groups:
            raise EpcError(f"conv weight {op.weight} {list(w)} (groups={op.groups}) does not "
                           f"apply to input {list(x)}")
        hs = [_pool_out(x[1 + i], w[2 + i], op.stride[i], op.pads[i], op.pads[2 + i],
                        op.dilation[i], False) for i in range(2)]
        return (w[0], *hs)
    if isinstance(op, (MaxPool, AvgPool)):
        if len(x) != 3:
            raise EpcError(f"{op.kind} needs a [C, H, W] input, got {list(x)}")
        dil = op.dilation if isinstance(op, MaxPool) else [1, 1]
        hs = [_pool_out(x[1 + i], op.kernel[i], op.stride[i], op.pads[i], op.pads[2 + i],
                        dil[i], op.ceil_mode) for i in range(2)]
        return (x[0], *hs)
    if isinstance(op, GlobalAvgPool):
        if len(x) != 3:
            raise EpcError(f"global average pool needs a [C, H, W] input, got {list(x)}")
        return (x[0], 1, 1) if op.keepdims else (x[0],)
    if isinstance(op, Flatten):
        return (int(np.prod(x)),)
    if isinstance(op, (Identity, Dropout, Softmax, Act, ChannelScale, Bias, BatchNorm)):
        return x
    if isinstance(op, Add):
        shapes = {tuple(s) for s in in_shapes}
        if len(shapes) != 1:
            raise EpcError(f"add of differently shaped inputs {sorted(shapes)}")
        return x
    raise EpcError(f"no shape rule for op {type(op).__name__}")


# --------------------------------------------------------------------------- helpers
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


# --------------------------------------------------------------------------- linear ops
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


def forward(op, x: torch.Tensor, weights: Weights) -> tuple[torch.Tensor, Any]:
    """Apply a linear op to a batch. Returns (y, ctx) where ctx feeds `adjoint`."""
    if isinstance(op, Dense):
        return x @ _w(weights, op.weight, x).t(), None
    if isinstance(op, Conv):
        xp, pad = conv_input(op, x)
        return (F.conv2d(xp, _w(weights, op.weight, x), None, op.stride, pad, op.dilation,
                         op.groups), x.shape)
    if isinstance(op, MaxPool):
        xp, pad = maxpool_input(op, x)
        y, idx = F.max_pool2d(xp, op.kernel, op.stride, pad, op.dilation, op.ceil_mode,
                              return_indices=True)
        return y, (xp, idx, pad)
    if isinstance(op, AvgPool):
        if not _symmetric(op.pads):
            raise EpcError("avgpool with asymmetric padding is not supported")
        y = F.avg_pool2d(x, op.kernel, op.stride, (op.pads[0], op.pads[1]), op.ceil_mode,
                         op.count_include_pad)
        return y, x
    if isinstance(op, GlobalAvgPool):
        return x.mean(dim=(2, 3), keepdim=op.keepdims), x.shape
    if isinstance(op, Flatten):
        return x.reshape(x.shape[0], -1), x.shape
    if isinstance(op, Identity):
        return x, None
    if isinstance(op, ChannelScale):
        return x * _channel_view(_w(weights, op.weight, x), x.dim()), None
    raise EpcError(f"op {op.kind} is not a linear op")


def adjoint(op, g: torch.Tensor, ctx: Any, weights: Weights) -> torch.Tensor:
    """The transpose of `forward` at the point that produced `ctx`, applied to g."""
    if isinstance(op, Dense):
        return g @ _w(weights, op.weight, g)
    if isinstance(op, Conv):
        w = _w(weights, op.weight, g)
        in_shape = ctx
        if _symmetric(op.pads):
            return torch.nn.grad.conv2d_input(in_shape, w, g, op.stride,
                                              (op.pads[0], op.pads[1]), op.dilation, op.groups)
        ph, pw = in_shape[2] + op.pads[0] + op.pads[2], in_shape[3] + op.pads[1] + op.pads[3]
        gp = torch.nn.grad.conv2d_input((in_shape[0], in_shape[1], ph, pw), w, g, op.stride, 0,
                                        op.dilation, op.groups)
        return gp[:, :, op.pads[0]:op.pads[0] + in_shape[2], op.pads[1]:op.pads[1] + in_shape[3]]
    if isinstance(op, MaxPool):
        xp, idx, pad = ctx
        gx = torch.ops.aten.max_pool2d_with_indices_backward(
            g, xp, op.kernel, op.stride, list(pad), op.dilation, op.ceil_mode, idx)
        if not _symmetric(op.pads):
            h, w = xp.shape[2] - op.pads[0] - op.pads[2], xp.shape[3] - op.pads[1] - op.pads[3]
            gx = gx[:, :, op.pads[0]:op.pads[0] + h, op.pads[1]:op.pads[1] + w]
        return gx
    if isinstance(op, AvgPool):
        x = ctx
        return torch.ops.aten.avg_pool2d_backward(
            g, x, op.kernel, op.stride, [op.pads[0], op.pads[1]], op.ceil_mode,
            op.count_include_pad, None)
    if isinstance(op, GlobalAvgPool):
        n, c, h, w = ctx
        return (g.reshape(n, c, 1, 1) / (h * w)).expand(n, c, h, w)
    if isinstance(op, Flatten):
        return g.reshape(ctx)
    if isinstance(op, Identity):
        return g
    if isinstance(op, ChannelScale):
        return g * _channel_view(_w(weights, op.weight, g), g.dim())
    raise EpcError(f"op {op.kind} is not a linear op")


def chain_forward(ops: list, x: torch.Tensor, weights: Weights) -> tuple[torch.Tensor, list]:
    """Apply a coupling's op chain; returns (y, contexts) for `chain_adjoint`."""
    ctxs = []
    for op in ops:
        x, ctx = forward(op, x, weights)
        ctxs.append(ctx)
    return x, ctxs


def chain_adjoint(ops: list, g: torch.Tensor, ctxs: list, weights: Weights) -> torch.Tensor:
    for op, ctx in zip(reversed(ops), reversed(ctxs)):
        g = adjoint(op, g, ctx, weights)
    return g


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


# --------------------------------------------------------------------------- ff-only ops
def apply_node_op(op, xs: list[torch.Tensor], weights: Weights) -> torch.Tensor:
    """Evaluate any feedforward op (the reference interpreter of the feedforward form)."""
    if getattr(op, "linear", False):
        return forward(op, xs[0], weights)[0]
    x = xs[0] if xs else None
    if isinstance(op, Bias):
        return x + _w(weights, op.weight, x)
    if isinstance(op, BatchNorm):
        sc, sh = _w(weights, op.scale, x), _w(weights, op.shift, x)
        mu, var = _w(weights, op.mean, x), _w(weights, op.var, x)
        k = sc / torch.sqrt(var + op.epsilon)
        return x * _channel_view(k, x.dim()) + _channel_view(sh - mu * k, x.dim())
    if isinstance(op, Act):
        return activate(op.fn, x)
    if isinstance(op, Add):
        out = xs[0]
        for y in xs[1:]:
            out = out + y
        return out
    if isinstance(op, Dropout):
        return x
    if isinstance(op, Softmax):
        return torch.log_softmax(x, dim=1) if op.log else torch.softmax(x, dim=1)
    raise EpcError(f"no evaluation rule for op {type(op).__name__}")


def macs(op, in_shape: Shape, out_shape_: Shape, weights: Weights) -> int:
    """Multiply-accumulates per sample of one forward application (for --stats)."""
    if isinstance(op, Dense):
        return int(np.prod(weights[op.weight].shape))
    if isinstance(op, Conv):
        w = weights[op.weight].shape
        return int(np.prod(out_shape_)) * int(np.prod(w[1:]))
    if isinstance(op, (MaxPool, AvgPool)):
        return int(np.prod(out_shape_)) * int(np.prod(op.kernel))
    if isinstance(op, (GlobalAvgPool, ChannelScale)):
        return int(np.prod(in_shape))
    return 0


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
