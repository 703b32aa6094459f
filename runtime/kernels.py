"""Faster forms of reference ops for the engine's hot loop, equal to them bit for bit.

`compiler.ops` holds the reference form of every linear op: plain torch calls, used by the
compiler's verifier and by the bench's autograd baseline (written the way published EP
code is). The engine calls these instead wherever the reference form leaves speed on the
table; each returns exactly what `compiler.ops.forward` returns (values, argmax indices
and the context the adjoint takes), which tests/test_kernels.py checks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from epc.compiler import ops as O
from epc.compiler.ir import MaxPool


def maxpool_forward(op: MaxPool, x: torch.Tensor):
    """Max-pool with argmax indices, as `compiler.ops.forward`.

    On CPU, PyTorch's NCHW max-pool kernel walks one small plane at a time; for the
    8x8 / 4x4 planes of conv nets on digits it took 40% of a conv net's settling sweep.
    Its channels-last kernel vectorises over channels: pooling a channels-last copy and
    converting back is ~3x faster, with the same values and the same indices (the scan
    order within a window, which decides ties, does not depend on the memory format).
    """
    xp, pad = O.maxpool_input(op, x)
    if xp.device.type != "cpu" or xp.dim() != 4:
        y, idx = F.max_pool2d(xp, op.kernel, op.stride, pad, op.dilation, op.ceil_mode,
                              return_indices=True)
        return y, (xp, idx, pad)
    y, idx = F.max_pool2d(xp.contiguous(memory_format=torch.channels_last), op.kernel,
                          op.stride, pad, op.dilation, op.ceil_mode, return_indices=True)
    return y.contiguous(), (xp, idx.contiguous(), pad)


def chain_forward(ops: list, x: torch.Tensor, weights) -> tuple[torch.Tensor, list]:
    """`compiler.ops.chain_forward` with the faster kernels above."""
    ctxs = []
    for op in ops:
        x, ctx = maxpool_forward(op, x) if isinstance(op, MaxPool) else O.forward(op, x, weights)
        ctxs.append(ctx)
    return x, ctxs
