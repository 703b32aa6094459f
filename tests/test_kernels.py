"""The engine's faster kernels against the reference ops (equal bit for bit, ties
included), and the optimiser's flat update against the per-weight formulas."""
import math

import pytest
import torch

from epc.compiler import ops as O
from epc.compiler.ir import MaxPool
from epc.runtime import kernels as K
from epc.runtime.learn import NonFiniteGradient, Optimizer

POOLS = [
    MaxPool([2, 2], [2, 2]),
    MaxPool([3, 3], [2, 2], pads=[1, 1, 1, 1]),
    MaxPool([2, 2], [2, 2], pads=[0, 0, 1, 1]),          # asymmetric: padded with -inf
    MaxPool([3, 3], [1, 1], dilation=[2, 2]),
    MaxPool([2, 2], [2, 2], ceil_mode=True),
    MaxPool([1, 3], [1, 2]),
]


@pytest.mark.parametrize("op", POOLS, ids=lambda op: f"k{op.kernel}s{op.stride}p{op.pads}"
                         f"d{op.dilation}c{int(op.ceil_mode)}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_maxpool_kernel_equals_reference(op, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.rand((5, 7, 9, 9), generator=g, dtype=dtype)
    # clipped states: wide regions of exact ties at 0 and 1 decide which index wins
    for t in (x, x.mul(3).sub(1).clamp(0, 1), torch.zeros_like(x)):
        y, (xp, idx, pad) = K.maxpool_forward(op, t)
        y0, (xp0, idx0, pad0) = O.forward(op, t, {})
        assert torch.equal(y, y0) and torch.equal(idx, idx0) and pad == pad0
        assert torch.equal(xp, xp0) and y.is_contiguous() and idx.is_contiguous()
        gy = torch.rand(y.shape, generator=g, dtype=dtype)
        assert torch.equal(O.adjoint(op, gy, (xp, idx, pad), {}),
                           O.adjoint(op, gy, (xp0, idx0, pad0), {}))


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(16, 8, generator=g), "b1": torch.randn(16, generator=g),
            "w2": torch.randn(3, 16, generator=g), "frozen": torch.randn(4, generator=g)}


def _loop_reference(kind, steps, grads, **kw):
    """The textbook per-weight update, written out with the same operation order."""
    P = _params()
    m = {k: torch.zeros_like(v) for k, v in P.items()}
    v = {k: torch.zeros_like(p) for k, p in P.items()}
    lr, wd, b1, b2, eps = kw["lr"], kw["weight_decay"], 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        for k, g in grads[t - 1].items():
            g = g * 1.0
            g = g + P[k] * wd
            if kind == "sgd":
                m[k] = m[k] * kw["momentum"] + g
                P[k] = P[k] - m[k] * lr
            else:
                m[k] = m[k] * b1 + g * (1 - b1)
                v[k] = v[k] * b2 + g * g * (1 - b2)
                mh, vh = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
                P[k] = P[k] - (mh * lr) / (vh.sqrt() + eps)
    return P


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("partial", [False, True])
def test_flat_optimiser_matches_the_per_weight_update(kind, partial):
    names = ["w1", "b1", "w2"]
    g = torch.Generator().manual_seed(1)
    grads = [{k: torch.randn(_params()[k].shape, generator=g) for k in names}
             for _ in range(4)]
    if partial:   # a weight without a gradient is left alone, moments included
        for gr in grads[1:3]:
            del gr["b1"]
    kw = dict(lr=1e-2, weight_decay=1e-3, momentum=0.9)
    P = _params()
    opt = Optimizer(P, names, kind=kind, cosine=False, **kw)
    frozen = P["frozen"]
    for gr in grads:
        opt.step(gr)
    ref = _loop_reference(kind, 4, grads, **kw)
    for k in names:
        torch.testing.assert_close(P[k], ref[k], rtol=1e-6, atol=1e-7)
    assert P["frozen"] is frozen and torch.equal(frozen, _params()["frozen"])
    # the named tensors are views of the one flat buffer the update runs on
    base = opt.flat.untyped_storage().data_ptr()
    assert all(P[k].untyped_storage().data_ptr() == base for k in names)
    assert math.isclose(float(opt.flat.sum()), sum(float(P[k].sum()) for k in names),
                        rel_tol=1e-5)


def test_non_finite_gradient_changes_nothing():
    P = _params()
    opt = Optimizer(P, ["w1", "b1"], lr=1e-2)
    before = {k: v.clone() for k, v in P.items()}
    bad = {"w1": torch.zeros(16, 8), "b1": torch.full((16,), float("nan"))}
    with pytest.raises(NonFiniteGradient, match="b1"):
        opt.step(bad)
    assert all(torch.equal(P[k], before[k]) for k in P) and opt.step_count == 0


def test_a_skipped_step_moves_the_schedule_not_the_moments():
    """A step with no gradient (the implicit trainer with no sample left) advances the
    cosine schedule as a step would, while Adam's moments and bias correction count only
    the updates applied; a checkpoint carries both counts, an older one reads as none
    skipped."""
    grads = {"w1": torch.ones(16, 8), "b1": torch.ones(16)}
    P, Q = _params(), _params()
    a = Optimizer(P, ["w1", "b1"], lr=1e-2, cosine=True, total_steps=4)
    b = Optimizer(Q, ["w1", "b1"], lr=1e-2, cosine=True, total_steps=4)
    a.step(grads)
    a.skip()
    b.step(grads)
    b.step(grads)
    assert a.current_lr() == b.current_lr() < 1e-2
    assert a.step_count == 1 and a.skipped_count == 1
    assert torch.allclose(a.m["w1"], torch.full((16, 8), 0.1))    # one update's moment
    c = Optimizer(_params(), ["w1", "b1"], lr=1e-2, cosine=True, total_steps=4)
    c.load_state_arrays(a.state_arrays(), "ck")
    assert (c.step_count, c.skipped_count, c.current_lr()) == (1, 1, a.current_lr())
    old = {k: v for k, v in a.state_arrays().items() if k != "opt.skipped"}
    c.load_state_arrays(old, "ck")
    assert c.skipped_count == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_sqrt_floor_changes_no_bit(dtype):
    """The floor under vh (which keeps torch's sqrt off its slow path for zeros and
    denormals) must leave every update bit-identical to the plain sqrt(vh) + eps."""
    g = torch.Generator().manual_seed(2)
    shape = (64, 50)
    grads = []
    for t in range(6):
        x = torch.randn(shape, generator=g, dtype=dtype)
        x[:20] = 0.0                                         # weights never reached
        x[20:30] *= 10.0 ** -torch.randint(10, 30, (10, 1), generator=g).to(dtype)  # g*g tiny
        x[30:34] = 1e-300 if dtype == torch.float64 else 1e-40  # denormal gradients
        grads.append({"w": x})
    runs = []
    for floor in (True, False):
        # zero weights: every update, however small, shows in the weights' bits
        P = {"w": torch.zeros(shape, dtype=dtype)}
        opt = Optimizer(P, ["w"], lr=1e-3, weight_decay=0.0, cosine=False)
        assert opt.sqrt_floor > 0
        if not floor:
            opt.sqrt_floor = 0.0
        for gr in grads:
            opt.step(gr)
        runs.append((P["w"].clone(), opt.v_flat.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert bool((runs[0][1] == 0).any())     # the slow-path inputs really occurred


CL = torch.channels_last


@pytest.mark.parametrize("op", POOLS, ids=lambda op: f"k{op.kernel}s{op.stride}p{op.pads}"
                         f"d{op.dilation}c{int(op.ceil_mode)}")
def test_maxpool_on_channels_last_states_and_frozen_gather(op):
    """A channels-last input is pooled in place (values and indices as the reference's,
    ties included, and channels-last); a frozen selection's gather reads exactly the
    pooled values, in either layout, with offsets built for either layout."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand((5, 7, 9, 9), generator=g, dtype=torch.float64)
    for t in (x, x.mul(3).sub(1).clamp(0, 1), torch.zeros_like(x)):
        y0, ctx0 = O.forward(op, t, {})
        xp0, idx0 = ctx0[:2]
        y, ctx = K.maxpool_forward(op, t.contiguous(memory_format=CL))
        xp, idx = ctx[:2]
        assert K.is_channels_last(y) and K.is_channels_last(idx) and K.is_channels_last(xp)
        assert torch.equal(y, y0) and torch.equal(idx, idx0) and ctx[2] == ctx0[2]
        # the unpool of an NCHW gradient at a channels-last argmax, as the reference's
        gy = torch.rand(y.shape, generator=g, dtype=torch.float64)
        got = K.chain_adjoint([op], gy, [ctx], {})
        assert torch.equal(got, O.adjoint(op, gy, ctx0, {}))
        assert K.is_channels_last(got) or not O._symmetric(op.pads)   # (else a crop view)
        for src in (xp0, xp):
            for built in (None, K.gather_index(xp0, idx0), K.gather_index(xp, idx)):
                assert torch.equal(K.maxpool_gather(src, idx, built), y0)


CONVS = [  # (stride, pads, dilation, groups, input size): output padding 0 and 1 both
    ([1, 1], [1, 1, 1, 1], [1, 1], 1, 8),
    ([2, 2], [1, 1, 1, 1], [1, 1], 1, 8),
    ([2, 2], [0, 0, 0, 0], [1, 1], 2, 9),
    ([1, 1], [2, 2, 2, 2], [2, 2], 1, 7),
    ([2, 1], [1, 0, 1, 0], [1, 1], 4, 8),
    ([1, 1], [0, 1, 1, 0], [1, 1], 1, 6),            # asymmetric: the reference path
]


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: f"s{s[0]}p{s[1]}d{s[2]}g{s[3]}n{s[4]}")
def test_conv_adjoint_is_the_reference_transpose(spec):
    """The engine's transposed conv: on NCHW the reference's bits; on channels-last the
    same up to float sum order, and channels-last (where the reference turns NCHW)."""
    from epc.compiler.ir import Conv
    stride, pads, dil, groups, size = spec
    g = torch.Generator().manual_seed(3)
    op = Conv("w", stride=stride, pads=pads, dilation=dil, groups=groups)
    W = {"w": torch.randn(8, 8 // groups, 3, 3, generator=g, dtype=torch.float64)}
    x = torch.rand((3, 8, size, size), generator=g, dtype=torch.float64)
    y, ctx = O.forward(op, x, W)
    gy = torch.rand(y.shape, generator=g, dtype=torch.float64)
    ref = O.adjoint(op, gy, ctx, W)
    assert ref.shape == x.shape
    assert torch.equal(K.conv_adjoint(op, gy, ctx, W), ref)
    got = K.chain_adjoint([op], gy.contiguous(memory_format=CL), [ctx], W)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if O._symmetric(pads):
        assert K.is_channels_last(got)
