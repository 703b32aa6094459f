"""Faster forms of reference ops for the engine's hot loop.

`compiler.ops` holds the reference form of every linear op: plain torch calls, used by the
compiler's verifier and by the bench's autograd baseline (written the way published EP
code is). The engine calls these instead wherever the reference form leaves speed on the
table. On tensors in the default (NCHW) layout each returns exactly what the reference
returns (values, argmax indices and the context the adjoint takes); on channels-last
tensors (the engine's layout for image states on CPU, see `runtime.engine`) max-pool,
unpool and frozen-selection gathers are still exact, and a convolution differs from the
NCHW one only in the order of its float sums (oneDNN blocks the channels differently).
tests/test_kernels.py checks both.

`KERNELS` is the op registry as the engine runs it: the reference rules, with the max-pool
and conv rules replaced by subclasses using these kernels (any other op, a new one
included, runs its reference rule; a faster kernel for it is an optional addition here).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from epc.compiler import ops as O
from epc.compiler.ir import Conv, MaxPool

CL = torch.channels_last


def is_channels_last(x: torch.Tensor) -> bool:
    """x is laid out channels-last and not also plain contiguous (a tensor with one channel
    or a 1x1 plane is both, and then the NCHW path is the right one)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=CL)


def maxpool_forward(op: MaxPool, x: torch.Tensor):
    """Max-pool with argmax indices, as `compiler.ops.forward`.

    On CPU, PyTorch's NCHW max-pool kernel walks one small plane at a time; for the
    8x8 / 4x4 planes of conv nets on digits it took 40% of a conv net's settling sweep.
    Its channels-last kernel vectorises over channels. A channels-last input is pooled as
    it is (values and indices come back channels-last); an NCHW one is pooled as a
    channels-last copy and converted back, still ~3x faster. Values and indices are the
    same either way: the scan order within a window, which decides ties, does not depend
    on the memory format.
    """
    xp, pad = O.maxpool_input(op, x)
    if xp.device.type != "cpu" or xp.dim() != 4 or is_channels_last(xp):
        y, idx = F.max_pool2d(xp, op.kernel, op.stride, pad, op.dilation, op.ceil_mode,
                              return_indices=True)
        return y, (xp, idx, pad)
    y, idx = F.max_pool2d(xp.contiguous(memory_format=CL), op.kernel,
                          op.stride, pad, op.dilation, op.ceil_mode, return_indices=True)
    return y.contiguous(), (xp, idx.contiguous(), pad)


class GatherIndex(NamedTuple):
    """Where each output of a frozen max-pool reads its input, as per-sample offsets in the
    input's memory order ([N, C*Ho*Wo] in that order), for one layout of the input."""

    channels_last: bool
    index: torch.Tensor


def gather_index(xp: torch.Tensor, idx: torch.Tensor) -> GatherIndex:
    """The offsets `maxpool_gather` reads for argmax `idx` (positions within one channel
    plane, as max_pool2d returns them) on an input laid out like xp."""
    n, c, h, w = xp.shape
    ch = torch.arange(c, device=idx.device)
    if is_channels_last(xp):     # offset of (p, c) in [H*W, C] order: p*C + c
        return GatherIndex(True, (idx.permute(0, 2, 3, 1) * c + ch).reshape(n, -1))
    return GatherIndex(False, (idx + ch.view(1, c, 1, 1) * (h * w)).reshape(n, -1))


def maxpool_gather(xp: torch.Tensor, idx: torch.Tensor,
                   index: GatherIndex | None = None) -> torch.Tensor:
    """A max-pool with its selections frozen: each output reads the (padded) input xp at
    the argmax `idx` an earlier `maxpool_forward` recorded, a linear map.

    One gather over each sample's values in memory order with precomputed offsets
    (`gather_index`, kept with the frozen selection) is ~2x faster than gathering over
    the plane axis, which for a channels-last input is a strided axis; the values are
    the same reads. `index` is used when it was built for xp's layout."""
    n, c = xp.shape[:2]
    ho, wo = idx.shape[2:]
    cl = is_channels_last(xp)
    if not (cl or xp.is_contiguous()):
        return xp.flatten(2).gather(2, idx.flatten(2)).reshape(idx.shape)
    if index is None or index.channels_last != cl:
        index = gather_index(xp, idx)
    if cl:
        y = xp.permute(0, 2, 3, 1).reshape(n, -1).gather(1, index.index)
        return y.view(n, ho, wo, c).permute(0, 3, 1, 2)
    return xp.reshape(n, -1).gather(1, index.index).view(n, c, ho, wo)


def conv_adjoint(op: Conv, g: torch.Tensor, in_shape, weights) -> torch.Tensor:
    """The transposed convolution, as `compiler.ops.adjoint` of a conv.

    `torch.nn.grad.conv2d_input` hands back NCHW whatever g's layout; `F.conv_transpose2d`
    with the output padding that restores `in_shape` keeps a channels-last g channels-last
    (and is ~20% faster there). On NCHW tensors the two are the same computation, bit for
    bit. Asymmetric padding, or an in_shape no output padding reaches, takes the
    reference."""
    if not O._symmetric(op.pads):
        return O.adjoint(op, g, in_shape, weights)
    w = O._w(weights, op.weight, g)
    k = w.shape[2:]
    extra = []
    for a in range(2):
        full = ((g.shape[2 + a] - 1) * op.stride[a] - 2 * op.pads[a]
                + op.dilation[a] * (k[a] - 1) + 1)
        e = in_shape[2 + a] - full
        if not 0 <= e < max(op.stride[a], op.dilation[a]):
            return O.adjoint(op, g, in_shape, weights)
        extra.append(e)
    return F.conv_transpose2d(g, w, None, op.stride, (op.pads[0], op.pads[1]), tuple(extra),
                              op.groups, op.dilation)


class MaxPoolKernels(O.MaxPoolRule):
    """The max-pool with the kernels above; its frozen selection, as the engine keeps it,
    is (argmax indices, their `GatherIndex`)."""

    def forward(self, op, x, weights):
        return maxpool_forward(op, x)

    def adjoint(self, op, g, ctx, weights):
        # A max-pool whose input was channels-last gets its incoming gradient channels-last
        # too: torch's unpool kernel converts mismatched layouts itself, at ~5x the cost of
        # the unpool (the gradient is the pooled, smaller tensor: converting it is cheap).
        if is_channels_last(ctx[0]) and not is_channels_last(g):
            g = g.contiguous(memory_format=CL)
        return super().adjoint(op, g, ctx, weights)

    def freeze(self, op, ctx):
        xp, idx, _ = ctx
        return idx, gather_index(xp, idx)

    def forward_frozen(self, op, x, frozen):
        idx, index = frozen
        xp, pad = O.maxpool_input(op, x)
        return maxpool_gather(xp, idx, index), (xp, idx, pad)

    @staticmethod
    def take_frozen(frozen, take):
        """A frozen selection with `take` applied to its batch rows."""
        idx, index = frozen
        return take(idx), GatherIndex(index.channels_last, take(index.index))


class ConvKernels(O.ConvRule):
    def adjoint(self, op, g, ctx, weights):
        return conv_adjoint(op, g, ctx, weights)


# The op registry as the engine runs it: the reference rules, with the two above in place
# of theirs (every other op, including any added to compiler.ops, runs its reference).
KERNELS: dict[type, O.OpRule] = {**O.RULES, MaxPool: MaxPoolKernels(), Conv: ConvKernels()}


def rule(op) -> O.OpRule:
    """The engine's rule for an IR op (a faster equal one where this module has it)."""
    try:
        return KERNELS[type(op)]
    except KeyError:
        return O.rule(op)   # registered after this module was imported, or an error


def chain_forward(ops: list, x: torch.Tensor, weights) -> tuple[torch.Tensor, list]:
    """`compiler.ops.chain_forward` with the faster kernels above."""
    ctxs = []
    for op in ops:
        x, ctx = rule(op).forward(op, x, weights)
        ctxs.append(ctx)
    return x, ctxs


def chain_adjoint(ops: list, g: torch.Tensor, ctxs: list, weights) -> torch.Tensor:
    """`compiler.ops.chain_adjoint` with the faster kernels above."""
    for op, ctx in zip(reversed(ops), reversed(ctxs)):
        g = rule(op).adjoint(op, g, ctx, weights)
    return g
