"""The op registry (compiler/ops.py): one entry per IR op, and nothing else to touch.

Every IR op type has a rule; each linear rule's adjoint is the transpose of its forward,
its shape rule and its shape-only contexts agree with running it, and its core instruction
(the neuromorphic lowering) prints, parses and executes as the op does. The last test adds
an op the way the docs say to (a dataclass and a rule, nothing else) and runs it through the
verifier, the text IR, `epc inspect --stats`, the engine and the quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from epc.compiler import ir, ops as O
from epc.compiler.errors import EpcError
from epc.compiler.inspect import stats
from epc.compiler.ir import (AdaptiveAvgPool, AvgPool, ChannelScale, Conv, Coupling, Cost, Dense,
                             Flatten, GlobalAvgPool, Graph, Identity, Input, MaxPool, Pad,
                             Permute, Schedule, State)
from epc.compiler.text import parse, print_graph
from epc.compiler.verify import problems
from epc.runtime import kernels as K
from epc.runtime.engine import Engine
from epc.targets.neuromorphic.assembler import _op_text, _Parser
from epc.targets.neuromorphic.isa import SynOp
from epc.targets.torch import check_supported

RNG = np.random.default_rng(0)

# (op, per-sample input shape, weights)
SAMPLES = [
    (Dense("w"), (6,), {"w": RNG.standard_normal((4, 6))}),
    (Conv("w", [1, 1], [1, 1, 1, 1]), (3, 5, 5), {"w": RNG.standard_normal((4, 3, 3, 3))}),
    (Conv("w", [2, 1], [0, 1, 1, 0], [1, 2], 2), (4, 7, 6),
     {"w": RNG.standard_normal((6, 2, 3, 2))}),
    (MaxPool([2, 2], [2, 2]), (3, 6, 6), {}),
    (MaxPool([3, 3], [2, 2], [1, 0, 0, 1], ceil_mode=True), (2, 7, 7), {}),
    (AvgPool([2, 2], [2, 2]), (3, 6, 6), {}),
    (AvgPool([3, 3], [1, 1], [1, 1, 1, 1], count_include_pad=True), (2, 5, 5), {}),
    (AvgPool([7, 7], [1, 1], [0, 0, 1, 1]), (2, 7, 7), {}),   # inception_v1's: pad excluded
    (AvgPool([3, 2], [2, 1], [1, 0, 0, 1], count_include_pad=True), (2, 6, 5), {}),
    (GlobalAvgPool(), (3, 4, 4), {}),
    (GlobalAvgPool(keepdims=False), (3, 4, 4), {}),
    (Flatten(), (2, 3, 3), {}),
    (Identity(), (5,), {}),
    (ChannelScale("w"), (3, 4, 4), {"w": RNG.standard_normal(3)}),
    (Pad([0, 1, 0, 0, 2, 1]), (3, 4, 4), {}),                   # spatial zero padding
    (Pad([2, 0, 0, 3, 0, 0]), (3, 4, 4), {}),                   # a concat part's placement
    (Pad([-1, 0, 1, -2, -1, 0]), (5, 5, 5), {}),                # crops (a slice) and a pad
    (Pad([3, -2]), (6,), {}),
    (Permute([2, 3, 16], [1, 0, 2], [6, 4, 4]), (6, 4, 4), {}),   # channel shuffle, 2 groups
    (Permute([3, 4, 4], [1, 2, 0], [48]), (3, 4, 4), {}),         # NCHW -> NHWC, flattened
    (AdaptiveAvgPool([3, 5]), (2, 7, 4), {}),                     # down in H, up in W
    (AdaptiveAvgPool([7, 7]), (2, 2, 2), {}),                     # vgg at 64 px: 2x2 -> 7x7
]
IDS = [f"{op.kind}{k}" for k, (op, _, _) in enumerate(SAMPLES)]


def _t(weights: dict) -> dict:
    return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in weights.items()}


def test_every_ir_op_has_exactly_its_rule():
    assert set(O.RULES) == set(ir.OP_TYPES.values())
    for t, r in O.RULES.items():
        assert r.op_type is t and r.linear == t.linear
        assert isinstance(r, O.LinearRule) == t.linear
    # the instructions of the core are those of the registry's linear rules, one each
    assert sorted(O.CORE_RULES) == sorted(r.core.kind for r in O.RULES.values()
                                          if getattr(r, "core", None))
    with pytest.raises(EpcError, match="no entry in the op registry"):
        O.rule(object())


@pytest.mark.parametrize("op,shape,w", SAMPLES, ids=IDS)
def test_adjoint_is_the_transpose_and_shapes_agree(op, shape, w):
    W = _t(w)
    x = torch.randn((3,) + shape, dtype=torch.float64)
    for rules in (O.RULES, K.KERNELS):           # the reference and the engine's kernels
        r = rules[type(op)]
        y, ctx = r.forward(op, x, W)
        assert tuple(y.shape[1:]) == O.out_shape(op, [shape], w)
        g = torch.randn_like(y)
        gx = r.adjoint(op, g, ctx, W)
        assert gx.shape == x.shape
        # <g, L x> = <L^T g, x> (for a max-pool: on the piece its argmax selects)
        torch.testing.assert_close((g * y).sum(), (gx * x).sum(), rtol=1e-10, atol=1e-10)
        if not r.context_needs_input:
            assert torch.equal(r.adjoint(op, g, r.shape_context(op, x.shape), W), gx)
        if r.piecewise:      # frozen at this input's selection: the same linear map
            frozen = r.freeze(op, ctx)
            assert torch.equal(r.forward_frozen(op, x, frozen)[0], y)
            x2 = torch.randn_like(x)
            yf, cf = r.forward_frozen(op, x2, frozen)
            torch.testing.assert_close((g * yf).sum(), (r.adjoint(op, g, cf, W) * x2).sum(),
                                       rtol=1e-10, atol=1e-10)


# samples whose settings the core cannot run (the rule's lowering refuses them by name)
NOT_ON_CORE = {"avgpool7": "asymmetric padding", "avgpool8": "asymmetric padding"}


@pytest.mark.parametrize("op,shape,w", SAMPLES, ids=IDS)
def test_core_instruction_round_trips_and_computes_the_op(op, shape, w, request):
    r = O.rule(op)
    refused = NOT_ON_CORE.get(request.node.callspec.id)
    if refused:
        with pytest.raises(EpcError, match=f"^test: .*{refused}"):
            r.lower(op, shape, "test")
        return
    fields = r.lower(op, shape, "test")
    if ir.op_weights(op):
        fields.update(w="w", e="e.w")
    syn = SynOp(**fields)
    text = _op_text(syn)
    assert text.split()[0] == r.core.kind
    back = _Parser("", "t").op(1, text, "t")
    assert back == syn                            # assembly text round trip
    r2, op2 = O.core_op(syn)
    assert r2 is r
    W = _t(w)
    x = torch.randint(-8, 9, (2,) + shape).double()
    y, ctx = r.forward(op, x, W)
    yc, cc = r.core_forward(op2, x, W)
    # an averaging pool is a window sum on the core (the chain's rmul/rshift divide it);
    # an adaptive one weighs each window so that one divisor serves them all
    area = (float(np.prod(op.kernel)) if isinstance(op, AvgPool) else
            float(np.prod(shape[1:])) if isinstance(op, GlobalAvgPool) else
            float(O._window_lcm(shape[1], op.out[0]) * O._window_lcm(shape[2], op.out[1]))
            if isinstance(op, AdaptiveAvgPool) else 1.0)
    assert (syn.rmul, syn.rshift) == O.fixed_point_reciprocal(int(area)) or area == 1.0
    torch.testing.assert_close(yc / area, y, rtol=1e-12, atol=1e-12)
    g = torch.randint(-8, 9, tuple(yc.shape)).double()
    gc = r.core_adjoint(op2, g, cc, W)
    torch.testing.assert_close(gc / area, r.adjoint(op, g, ctx, W), rtol=1e-12, atol=1e-12)
    if not r.piecewise:
        assert torch.equal(r.core_adjoint(op2, g, r.core_shape_context(op2, x.shape), W), gc)


def test_settings_the_core_cannot_run_are_refused_by_the_rule():
    asym = AvgPool([2, 2], [2, 2], [0, 0, 1, 1])
    r = O.rule(asym)
    assert r.unsupported(asym) is None          # the float runtime runs every setting
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    # pad excluded from the count: the last row/column of windows average what they hold
    want = torch.tensor([[3.0, 5.0, 6.5], [13.0, 15.0, 16.5], [20.5, 22.5, 24.0]])
    assert torch.equal(r.forward(asym, x, {})[0][0, 0], want)
    with pytest.raises(EpcError, match="c: average pool with asymmetric padding"):
        r.lower(asym, (1, 4, 4), "c")
    op = AvgPool([2, 2], [1, 1], [1, 1, 1, 1])      # padding excluded from the count
    with pytest.raises(EpcError, match="position-dependent divisor"):
        O.rule(op).lower(op, (1, 4, 4), "c")
    assert O.fixed_point_reciprocal(4) == (1, 2)
    rm, rs = O.fixed_point_reciprocal(9)
    assert abs(rm / 2 ** rs - 1 / 9) < 1 / 2 ** rs


# --------------------------------------------------------------------------- a new op
@dataclass
class Negate:
    """y = -x: a made-up linear op, declared as the docs say (a dataclass and a rule)."""

    kind: ClassVar[str] = "negate"
    linear: ClassVar[bool] = True


class NegateRule(O.LinearRule):
    def shape(self, op, in_shapes, weights):
        return tuple(in_shapes[0])

    def forward(self, op, x, weights):
        return -x, None

    def adjoint(self, op, g, ctx, weights):
        return -g

    def macs(self, op, in_shape, out_shape, weights):
        return int(np.prod(in_shape))


@pytest.fixture
def negate_op(monkeypatch):
    """Negate registered for the test only (the registry and the IR's op table)."""
    monkeypatch.setitem(ir.OP_TYPES, "negate", Negate)
    monkeypatch.setitem(O.RULES, Negate, None)       # undone after the test
    O.rule_for(Negate)(NegateRule)
    yield Negate


def _negate_graph() -> Graph:
    r = np.random.default_rng(1)
    g = Graph("neg", inputs=[Input("x", (4,))])
    ident = ir.Activation.identity()
    clip = ir.Activation.clip(0.0, 1.0)
    g.states = [State("h", (5,), clip, clip), State("out", (3,), ident, ident, role="output")]
    g.couplings = [Coupling("c1", "x", "h", [Dense("w1")]),
                   Coupling("c2", "h", "out", [Dense("w2"), Negate()], feedback=True)]
    g.costs = [Cost("label", "out")]
    g.schedule = Schedule("colour", [["h"], ["out"]], 50, 20, 1e-6)
    g.weights = {"w1": r.standard_normal((5, 4)) * 0.5, "w2": r.standard_normal((3, 5)) * 0.5}
    return g


def test_a_new_linear_op_needs_only_its_dataclass_and_rule(negate_op):
    g = _negate_graph()
    assert problems(g) == []
    check_supported(g)                                   # the torch target runs it
    assert stats(g)["macs_per_sweep"] == 20 + 2 * (15 + 3)
    assert print_graph(parse(print_graph(g))) == print_graph(g)   # the text IR
    eng = Engine(g, dtype=torch.float64)
    x = torch.rand(6, 4, dtype=torch.float64)
    batch = eng.prepare(x)
    res = eng.settle(batch, max_sweeps=200, tol=1e-12)
    h, out = res.states["h"], res.states["out"]
    # the fixed point of the drives the rule implies: out = -(W2 h), h = clip(W1 x - W2^T out)
    W1, W2 = (torch.as_tensor(g.weights[k]) for k in ("w1", "w2"))
    torch.testing.assert_close(out, -(h @ W2.t()), rtol=0, atol=1e-9)
    torch.testing.assert_close(h, (x @ W1.t() - out @ W2).clamp(0, 1), rtol=0, atol=1e-9)
    # the neuromorphic target refuses it by name: the rule declares no core instruction
    from epc.targets.neuromorphic.quantize import quantize_graph
    with pytest.raises(EpcError, match="coupling c2: op negate cannot be lowered"):
        quantize_graph(g)


@pytest.mark.parametrize("op, shape, w", SAMPLES, ids=IDS)
def test_ir_text_round_trips_the_op(op, shape, w):
    """Each sample op, as a node, prints and reads back to the same graph (the strict
    reader checks each attribute: a pad's pads may be negative and of any even length)."""
    g = ir.Graph("t", inputs=[ir.Input("x", shape)])
    g.nodes = [ir.Node("y", op, ["x"], O.out_shape(op, [shape], w))]
    g.outputs = ["y"]
    g.weights = dict(w)
    text = print_graph(g, weights="inline")
    back = parse(text)
    assert problems(back) == [] and back.nodes[0].op == op
    assert print_graph(back, weights="inline") == text


def test_ir_text_concat_round_trips_and_bad_new_attributes_are_refused():
    g = ir.Graph("t", inputs=[ir.Input("a", (2, 3, 3)), ir.Input("b", (4, 3, 3))])
    g.nodes = [ir.Node("y", ir.Concat(0), ["a", "b"], (6, 3, 3))]
    g.outputs = ["y"]
    text = print_graph(g)
    assert problems(parse(text)) == [] and print_graph(parse(text)) == text
    base = "epc-ir 1\ngraph t {\n  input x : [6, 4, 4]\n  node y = %s : [6, 4, 4]\n  output y\n}\n"
    for bad, why in [("pad(x) [pads=[1, 0, 0]]", "an even number"),
                     ("pad(x) [pads=[1.5, 0]]", "an even number"),
                     ("permute(x) [dims=[2, 3, 16], perm=[0, 0, 2], shape=[6, 4, 4]]",
                      "a permutation"),
                     ("permute(x) [dims=[0, 96], perm=[1, 0], shape=[6, 4, 4]]", "integers >= 1"),
                     ("adaptiveavgpool(x) [out=[0, 2]]", "two integers >= 1"),
                     ("concat(x) [axis=-1]", "an integer in")]:
        with pytest.raises(EpcError, match=why):
            parse(base % bad)
