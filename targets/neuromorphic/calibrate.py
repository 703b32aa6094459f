"""Calibrated rounding and bias correction for the quantization pass (`--calibrate DATA`).

With real equilibria at hand (the float runtime's free fixed points on training samples),
two corrections go beyond choosing exponents, and matter at 4-bit weights:

* Error-compensating rounding (the sequential scheme of OBQ / GPTQ): the mantissas of one
  weighted op are rounded one input column at a time, and each column's rounding error is
  pushed onto the columns not yet rounded, weighted by the inverse of the input Gram
  matrix H = X^T X of that op on the calibration activations. This minimises the error of
  the op's *output* on real inputs rather than the error of each weight, which is what the
  network sees. Exponents (the scale grid) are chosen beforehand and kept.
* Bias correction: after all weights are rounded, the mean error of each settled state's
  drive (the sum over its couplings of the forward output, and of the feedback adjoint,
  with rounded minus float weights) on the calibration equilibria is subtracted from the
  state's bias. Rounding errors that do not average out shift every neuron's operating
  point; this takes the shift out.

Both run only with calibration data; without it the pass rounds to nearest, as before.
docs/findings.md has what they do for 4-bit weights on the digits nets.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from epc.compiler import ops as O
from epc.compiler.ir import Conv, Dense, Graph, op_weights
from epc.compiler.ops import reduce_to_shape

DAMP = 0.01  # ridge added to H, as a share of its mean diagonal (H is often singular)


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def op_input_grams(coupling, k: int, x_src: np.ndarray, weights: dict,
                   chunk: int = 16) -> list[np.ndarray] | None:
    """H = X^T X of the k-th op of a coupling on the calibration inputs, where X holds the
    op's input as rows [samples (x positions for a conv), fan_in]: one per conv group, one
    for a dense; None where the op is not a plain dense or conv. Accumulated over chunks
    of samples, so a conv on 32x32 images never holds its whole im2col matrix."""
    op = coupling.ops[k]
    if not isinstance(op, (Dense, Conv)):
        return None
    # only the weights of the ops in front of this one, converted once for all chunks
    base = {n: _t(weights[n]) for o in coupling.ops[:k] for n in op_weights(o).values()}
    w = np.asarray(weights[op.weight])
    groups = op.groups if isinstance(op, Conv) else 1
    fan = int(np.prod(w.shape[1:]))
    grams = [np.zeros((fan, fan)) for _ in range(groups)]
    for i in range(0, len(x_src), chunk):
        x, _ = O.chain_forward(coupling.ops[:k], _t(x_src[i:i + chunk]), base)
        if isinstance(op, Dense):
            rows = x.reshape(x.shape[0], -1).numpy()
            grams[0] += rows.T @ rows
            continue
        pt, pl, pb, pr = op.pads
        xp = F.pad(x, (pl, pr, pt, pb))
        cin_g = w.shape[1]
        for gi in range(groups):
            cols = F.unfold(xp[:, gi * cin_g:(gi + 1) * cin_g], tuple(w.shape[2:]),
                            dilation=tuple(op.dilation), stride=tuple(op.stride))
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()  # [N*L, fan_in]
            grams[gi] += rows.T @ rows
    return grams


def _round_rows(w: np.ndarray, h: np.ndarray, step: np.ndarray, qmax: int) -> np.ndarray:
    """Mantissas of w [rows, fan_in] on the grid `step` [rows] that keep w @ x^T close,
    for inputs x with Gram matrix h = X^T X."""
    h = h.copy()
    d = np.diag(h).copy()
    dead = d <= 0
    h[dead, dead] = 1.0          # an input that is always 0: plain rounding, no propagation
    h += DAMP * max(float(d.mean()), 1e-12) * np.eye(len(h))
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T   # upper factor of H^-1
    except np.linalg.LinAlgError:
        return np.clip(np.floor(w / step[:, None] + 0.5), -qmax, qmax)
    w = w.copy()
    q = np.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = np.clip(np.floor(w[:, j] / step + 0.5), -qmax, qmax)
        err = (w[:, j] - q[:, j] * step) / u[j, j]
        w[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return q


def round_compensated(w: np.ndarray, exps: np.ndarray, qmax: int,
                      grams: list[np.ndarray]) -> np.ndarray:
    """Mantissas (int64, w's shape) of a dense [out, in] or conv [out, in/g, kh, kw] weight
    with exponents `exps` ([1] or [out]), rounded to keep the op's output on the inputs
    whose Gram matrices (one per group, from `op_input_grams`) are `grams`."""
    rows = w.reshape(w.shape[0], -1)
    step = (2.0 ** exps.astype(np.float64)).reshape(-1) * np.ones(w.shape[0])
    per = w.shape[0] // len(grams)
    q = np.zeros_like(rows)
    for gi, h in enumerate(grams):
        sl = slice(gi * per, (gi + 1) * per)
        q[sl] = _round_rows(rows[sl], h, step[sl], qmax)
    return q.astype(np.int64).reshape(w.shape)


def bias_corrections(g: Graph, acts: dict, rounded: dict) -> dict[str, np.ndarray]:
    """{bias weight name: correction to add} for the settled states with a bias: minus the
    mean drive error over the calibration samples (and over the positions a broadcast bias
    covers). `rounded` maps weight names to their dequantized (rounded) values."""
    base = {n: _t(w) for n, w in g.weights.items()}
    quant = dict(base)
    quant.update({n: _t(w) for n, w in rounded.items()})
    settled = {s.name for s in g.settled_states()}
    err: dict[str, torch.Tensor] = {}
    for c in g.couplings:
        if c.src not in acts or c.dst not in acts:
            continue
        xs, yd = _t(acts[c.src]), _t(acts[c.dst])
        f0, ctx0 = O.chain_forward(c.ops, xs, base)
        f1, ctx1 = O.chain_forward(c.ops, xs, quant)
        if c.dst in settled:
            err[c.dst] = err.get(c.dst, 0) + (f1 - f0)
        if c.feedback and c.src in settled:
            b0 = O.chain_adjoint(c.ops, yd, ctx0, base)
            b1 = O.chain_adjoint(c.ops, yd, ctx1, quant)
            err[c.src] = err.get(c.src, 0) + (b1 - b0)
    out = {}
    for st in g.states:
        if st.bias and st.name in err:
            b = np.asarray(g.weights[st.bias])
            e = err[st.name]
            # the mean over samples and the positions each bias entry covers: the sum the
            # EP bias gradient takes, over the number of terms summed into each entry
            out[st.bias] = -(reduce_to_shape(e, b.shape) * (b.size / e.numel())).numpy()
    return out
