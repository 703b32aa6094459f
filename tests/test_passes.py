"""Tests of the compile passes (compiler/passes/*).

Feedforward graphs are built by hand with the IR dataclasses and deterministic weights, so
these tests do not depend on the frontends. What is checked:
* golden IR dumps after every pass (tests/golden/*.ir; EPC_UPDATE_GOLDEN=1 rewrites them);
* semantics: canonicalize preserves run_feedforward; one forward sweep of the energy form
  (bounds lifted) reproduces run_feedforward of the source graph in float64;
* every pass's output verifies, prints and parses back exactly, and leaves its input alone;
* schedules are proper colourings (skips over two layers need a third colour);
* bad inputs raise EpcError with a useful message.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from epc.compiler.errors import EpcError
from epc.compiler.ir import (Act, Activation, Add, AvgPool, BatchNorm, Bias, ChannelScale, Conv,
                             Dense, Dropout, Flatten, GlobalAvgPool, Graph, Identity, Input,
                             MaxPool, Node, Softmax)
from epc.compiler.options import CompileOptions
from epc.compiler.passes import PASS_NAMES, PASSES, build_pipeline, opt_text, run_passes
from epc.compiler.passes import (canonicalize, pool_first, readout, residual, schedule,
                                 symmetrize, taps, teacher, to_energy)
from epc.compiler.passes.manager import PassManager
from epc.compiler.reference import forward_sweep, run_feedforward
from epc.compiler.text import parse, print_graph
from epc.compiler.verify import problems

GOLDEN = Path(__file__).parent / "golden"
RELU = Activation.relu()


# =========================================================================== builders
class Builder:
    """Appends nodes to a feedforward graph with shape inference and seeded weights."""

    def __init__(self, name: str, shape, seed: int = 0):
        self.g = Graph(name, inputs=[Input("x", tuple(shape))])
        self.rng = np.random.RandomState(seed)
        self.last = "x"

    def shape(self, v=None):
        return self.g.shape_of(v or self.last)

    def weight(self, name, shape, scale=None, positive=False):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        w = self.rng.uniform(-s, s, size=shape)
        if positive:
            w = np.abs(w) + 0.5
        self.g.weights[name] = w.astype(np.float32)
        return name

    def node(self, name, op, inputs=None, shape=None):
        from epc.compiler.ops import out_shape
        inputs = inputs or [self.last]
        shape = shape or out_shape(op, [self.g.shape_of(x) for x in inputs], self.g.weights)
        self.g.nodes.append(Node(name, op, list(inputs), tuple(shape)))
        self.last = name
        return name

    def conv(self, name, cout, k=3, stride=1, pad=1, groups=1, bias=True, src=None):
        src = src or self.last
        cin = self.shape(src)[0]
        self.weight(f"{name}.weight", (cout, cin // groups, k, k))
        self.node(name, Conv(f"{name}.weight", [stride, stride], [pad] * 4, [1, 1], groups), [src])
        if bias:
            self.weight(f"{name}.bias", (cout, 1, 1), scale=0.5)
            self.node(f"{name}_b", Bias(f"{name}.bias"))
        return self.last

    def dense(self, name, out, bias=True, src=None):
        src = src or self.last
        self.weight(f"{name}.weight", (out, self.shape(src)[0]))
        self.node(name, Dense(f"{name}.weight"), [src])
        if bias:
            self.weight(f"{name}.bias", (out,), scale=0.5)
            self.node(f"{name}_b", Bias(f"{name}.bias"))
        return self.last

    def bn(self, name, src=None):
        src = src or self.last
        c = self.shape(src)[0]
        shape = (c,)
        self.weight(f"{name}.scale", shape, scale=1.0, positive=True)
        self.weight(f"{name}.shift", shape, scale=0.5)
        self.weight(f"{name}.mean", shape, scale=0.5)
        self.weight(f"{name}.var", shape, scale=1.0, positive=True)
        return self.node(name, BatchNorm(f"{name}.scale", f"{name}.shift", f"{name}.mean",
                                         f"{name}.var", 1e-5), [src])

    def act(self, name, fn=RELU, src=None):
        return self.node(name, Act(fn), [src or self.last])

    def done(self, out=None):
        self.g.outputs = [out or self.last]
        assert problems(self.g) == [], problems(self.g)
        return self.g


def mlp(depth: int = 2, width: int = 12, softmax: bool = True) -> Graph:
    """x[16] -> (dense, bias, BN on the first, relu, dropout) x depth -> dense -> softmax."""
    b = Builder("mlp" if depth == 2 else f"mlp{depth}", (16,), seed=1)
    for k in range(1, depth + 1):
        b.dense(f"fc{k}", width)
        if k == 1:
            b.bn("bn1")
        b.act(f"relu{k}")
        if k == 1:
            b.node("drop1", Dropout())
    b.dense("head", 5)
    if softmax:
        b.node("prob", Softmax())
    return b.done()


def convnet() -> Graph:
    """conv+BN+relu -> conv(biased) -> maxpool -> relu -> avgpool -> flatten -> dense."""
    b = Builder("convnet", (2, 8, 8), seed=2)
    b.conv("conv1", 4)
    b.bn("bn1")
    b.act("relu1")
    b.conv("conv2", 6)
    b.node("pool2", MaxPool([2, 2], [2, 2]))           # max-pool of a biased conv output
    b.act("relu2")
    b.node("pool3", AvgPool([2, 2], [2, 2], [1, 1, 1, 1], count_include_pad=True))
    b.node("flat", Flatten())
    b.node("id", Identity())
    b.dense("fc", 5)
    return b.done()


def relu_pool_net() -> Graph:
    """conv -> relu -> maxpool 3x3/2 (padded) -> conv -> hardsigmoid -> maxpool 2x2 -> dense;
    plus a relu read by a pool and by the next op too (that pair must stay as it is)."""
    b = Builder("relu_pool_net", (2, 9, 9), seed=9)
    b.conv("conv1", 4)
    b.act("relu1")
    b.node("pool1", MaxPool([3, 3], [2, 2], [1, 1, 1, 1]))
    b.conv("conv2", 5)
    b.act("hs2", Activation.hardsigmoid(0.2, 0.5))
    b.node("pool2", MaxPool([2, 2], [2, 2]))
    r3 = b.act("relu3", Activation.clip(0.0, 6.0))
    p3 = b.node("pool3", MaxPool([1, 1], [1, 1]))
    b.node("join", Add(), [p3, r3])
    b.node("flat", Flatten())
    b.dense("fc", 5)
    return b.done()


def resnet() -> Graph:
    """Stem, a block with an identity shortcut, a block with a projection shortcut (BN)."""
    b = Builder("resnet", (3, 8, 8), seed=3)
    b.conv("stem", 4)
    stem = b.act("stem_relu")
    b.conv("b1c1", 4)
    b.act("b1r1")
    b.conv("b1c2", 4, bias=False)
    b.bn("b1bn2")
    b.node("b1add", Add(), ["b1bn2", stem])
    blk1 = b.act("b1out")
    b.conv("b2c1", 8, stride=2)
    b.act("b2r1")
    main = b.conv("b2c2", 8)
    b.conv("proj", 8, k=1, stride=2, pad=0, bias=False, src=blk1)
    proj = b.bn("projbn")
    b.node("b2add", Add(), [main, proj])
    b.act("b2out")
    b.node("gap", GlobalAvgPool(keepdims=True))
    b.node("flat", Flatten())
    b.dense("fc", 5)
    return b.done()


def bn_after_add() -> Graph:
    """A BatchNorm that cannot fold (its input is an Add) and a shared-weight dense."""
    b = Builder("bn_after_add", (2, 6, 6), seed=4)
    b.conv("c1", 3)
    r1 = b.act("r1")
    b.conv("c2", 3)
    b.node("add", Add(), [b.last, r1])
    b.bn("bn")
    b.act("r2")
    b.node("flat", Flatten())
    b.dense("fc", 4)
    return b.done()


def mobile() -> Graph:
    """Depthwise conv + ReLU6, pointwise conv + hardsigmoid, channel scale, dense readout."""
    b = Builder("mobile", (4, 6, 6), seed=5)
    b.conv("dw", 4, groups=4)
    b.act("relu6", Activation.clip(0.0, 6.0))
    b.conv("pw", 6, k=1, pad=0)
    b.weight("cs", (6,), scale=2.0)
    b.node("scale", ChannelScale("cs"))
    b.act("hsig", Activation.hardsigmoid(1 / 6, 0.5))
    b.node("gap", GlobalAvgPool(keepdims=False))
    b.dense("fc", 3)
    return b.done()


def affine_chain() -> Graph:
    """Biases pushed through padded convs, a padded avg-pool and a dense before a state."""
    b = Builder("affine_chain", (2, 5, 5), seed=12)
    b.conv("c1", 3)
    b.conv("c2", 3)                       # zero padding: the bias becomes position-dependent
    b.node("pool", AvgPool([2, 2], [2, 2], [1, 1, 1, 1], count_include_pad=True))
    b.act("r1")
    b.node("flat", Flatten())
    b.dense("fc1", 6)
    b.dense("fc2", 4)                     # dense after dense: one coupling, composed chain
    return b.done()


def chain_skip(n_hidden: int, skip_from: int, skip_to: int) -> Graph:
    """A dense chain h1..hn -> out with one identity skip h_from -> h_to (an Add)."""
    b = Builder(f"chain_{skip_from}_{skip_to}", (6,), seed=6)
    for k in range(1, n_hidden + 1):
        b.dense(f"fc{k}", 6)
        if k == skip_to:
            b.node(f"add{k}", Add(), [b.last, f"h{skip_from}"])
        b.act(f"h{k}")
    b.dense("out", 3)
    return b.done()


def maxpool_after_add() -> Graph:
    b = Builder("bad_pool", (2, 4, 4), seed=7)
    b.conv("c1", 2)
    r = b.act("r1")
    b.conv("c2", 2)
    b.node("add", Add(), [b.last, r])
    b.node("pool", MaxPool([2, 2], [2, 2]))
    b.act("r2")
    b.node("flat", Flatten())
    b.dense("fc", 3)
    return b.done()


MODELS = {"mlp": mlp, "convnet": convnet, "resnet": resnet, "bn_after_add": bn_after_add,
          "mobile": mobile, "affine_chain": affine_chain, "relu_pool_net": relu_pool_net}


def compile_(ff: Graph, **kw) -> Graph:
    opts = CompileOptions(**kw)
    if opts.teacher == "source":
        opts.teacher_graph = ff.copy()
    return PassManager(build_pipeline(opts)).run(ff, opts)


def stages(ff: Graph, opts: CompileOptions) -> list[tuple[str, Graph]]:
    """The graph after each pass, running the passes (conditions checked) one by one."""
    out, g = [], ff
    for p in build_pipeline(opts):
        g = p.run(g, opts)
        out.append((p.name, g))
    return out


def random_input(g: Graph, n: int = 3, seed: int = 0, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {i.name: scale * rng.standard_normal((n, *i.shape)) for i in g.inputs}


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def ff_logits(ff: Graph, x: dict) -> np.ndarray:
    """The source output before an output softmax (which canonicalize drops)."""
    g = ff.copy()
    last = g.node(g.outputs[0])
    if isinstance(last.op, Softmax):
        g.outputs = [last.inputs[0]]
    return run_feedforward(g, x)[g.outputs[0]]


# =========================================================================== pipeline API
def test_pipeline_order():
    assert PASS_NAMES == ("canonicalize", "pool_first", "to_energy", "symmetrize", "residual",
                          "taps", "teacher", "readout", "schedule")
    assert [p.name for p in build_pipeline(CompileOptions())] == list(PASS_NAMES)
    for mod in (canonicalize, pool_first, to_energy, symmetrize, residual, taps, teacher,
                readout, schedule):
        assert "Requires" in mod.__doc__ and "Ensures" in mod.__doc__


# =========================================================================== goldens
# The passes each golden case runs (the others are off under its options and are not
# printed): every pass runs in at least one case.
ALWAYS = ["canonicalize", "to_energy", "symmetrize", "residual", "schedule"]
GOLDEN_RAN = {
    "mlp": ALWAYS, "convnet": ALWAYS, "resnet": ALWAYS,
    "resnet_learned_taps": ALWAYS[:4] + ["taps", "schedule"],
    # bernoulli: pool_first runs unless told not to (here no pool: unchanged)
    "mlp5_taps_teacher": ["canonicalize", "pool_first"] + ALWAYS[1:4] + ["taps", "teacher",
                                                                         "schedule"],
    "relu_pool_net_pool_first": ["canonicalize", "pool_first"] + ALWAYS[1:],
    "mlp5_taps_readout_ce": ALWAYS[:4] + ["taps", "readout", "schedule"],
}
GOLDEN_CASES = {
    "mlp": (mlp, {}),
    "convnet": (convnet, {}),
    "resnet": (resnet, {}),
    "resnet_learned_taps": (resnet, {"identity_skip": "learned", "taps": "auto",
                                     "schedule": "sync"}),
    "mlp5_taps_teacher": (lambda: mlp(depth=5, width=6), {"taps": "auto", "teacher": "source",
                                                          "cost": "ce", "neuron": "bernoulli"}),
    "relu_pool_net_pool_first": (relu_pool_net, {"pool_first": True}),
    "mlp5_taps_readout_ce": (lambda: mlp(depth=5, width=6), {"taps": "auto", "readout": True,
                                                             "cost": "ce"}),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden_dumps(case):
    build, kw = GOLDEN_CASES[case]
    ff = build()
    opts = CompileOptions(**kw)
    if opts.teacher == "source":
        opts.teacher_graph = ff.copy()
    buf = io.StringIO()
    PassManager(build_pipeline(opts), print_after_all=True, out=buf).run(ff, opts)
    text = buf.getvalue()
    path = GOLDEN / f"{case}.ir"
    if os.environ.get("EPC_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run with EPC_UPDATE_GOLDEN=1"
    want = path.read_text()
    assert text == want, f"IR dump of {case} differs from {path} (EPC_UPDATE_GOLDEN=1 to update)"
    # --print-after-all prints exactly the passes that ran, in order; a pass that left the
    # IR as printed just before is one '(unchanged)' line, not a second copy
    assert re.findall(r"^// ----- IR after (\w+)", text, re.M) == GOLDEN_RAN[case]
    bodies = re.split(r"^// ----- IR after .*\n", text, flags=re.M)[1:]
    assert all(a != b for a, b in zip(bodies, bodies[1:]) if a and b)


def test_print_after_all_skips_passes_that_are_off_and_marks_unchanged_ones():
    """mlp under default options: pool_first, taps, teacher and readout are off and do not
    run; residual runs and changes nothing (no skips). --print-after of a pass that is off
    says so in one line."""
    ff, opts = mlp(), CompileOptions()
    buf = io.StringIO()
    pm = PassManager(build_pipeline(opts), print_after_all=True, out=buf)
    pm.run(ff, opts)
    assert [r.name for r in pm.records] == ALWAYS
    assert pm.skipped == ["pool_first", "taps", "teacher", "readout"]
    text = buf.getvalue()
    assert "// ----- IR after residual (unchanged)\n// ----- IR after schedule\n" in text
    assert text.count("epc-ir 1\n") == 4
    buf = io.StringIO()
    PassManager(build_pipeline(opts), print_after={"pool_first", "residual"},
                out=buf).run(ff, opts)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "// ----- pool_first did not run (--pool-first is off)"
    assert lines[1] == "// ----- IR after residual" and lines[2] == "epc-ir 1"
    assert "(unchanged)" not in buf.getvalue()     # to_energy's IR was not printed


def test_goldens_cover_every_pass_effect():
    """Each pass visibly changes at least one golden (so every pass is covered)."""
    changed = set()
    for case, (build, kw) in GOLDEN_CASES.items():
        ff = build()
        opts = CompileOptions(**kw)
        if opts.teacher == "source":
            opts.teacher_graph = ff.copy()
        prev = print_graph(ff)
        for name, g in stages(ff, opts):
            text = print_graph(g)
            if text != prev:
                changed.add(name)
            prev = text
    assert changed == set(PASS_NAMES)


# =========================================================================== semantics
@pytest.mark.parametrize("name", sorted(MODELS))
def test_canonicalize_preserves_semantics(name):
    ff = MODELS[name]()
    before = print_graph(ff)
    cg = canonicalize.run(ff, CompileOptions())
    assert print_graph(ff) == before, "canonicalize mutated its input"
    assert problems(cg) == []
    kinds = {n.op.kind for n in cg.nodes}
    assert not kinds & {"batchnorm", "identity", "dropout", "softmax"}
    x = random_input(ff, scale=3.0)
    assert rel_err(run_feedforward(cg, x)[cg.outputs[0]], ff_logits(ff, x)) < 1e-6


@pytest.mark.parametrize("name", sorted(MODELS) + ["chain_skip"])
@pytest.mark.parametrize("skip", ["identity", "learned"])
def test_forward_sweep_reproduces_source(name, skip):
    ff = chain_skip(4, 1, 3) if name == "chain_skip" else MODELS[name]()
    eg = compile_(ff, identity_skip=skip, taps="auto")
    # a large input drives ReLU6 / hard-sigmoid states into their saturated regions too
    x = random_input(ff, n=4, scale=4.0)
    got = forward_sweep(eg, x, lift_bounds=True)[eg.output_state().name]
    assert rel_err(got, ff_logits(ff, x)) < 1e-6


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pool_first_preserves_semantics_and_pools_before_activations(name):
    ff = MODELS[name]()
    cg = canonicalize.run(ff, CompileOptions())
    assert print_graph(pool_first.run(cg, CompileOptions())) == print_graph(cg)  # off: as is
    before = print_graph(cg)
    pg = pool_first.run(cg, CompileOptions(pool_first=True))
    assert print_graph(cg) == before and problems(pg) == []
    x = random_input(ff, scale=3.0)
    assert rel_err(run_feedforward(pg, x)[pg.outputs[0]], ff_logits(ff, x)) < 1e-6
    eg = compile_(ff, pool_first=True)
    got = forward_sweep(eg, x, lift_bounds=True)[eg.output_state().name]
    assert rel_err(got, ff_logits(ff, x)) < 1e-6
    if name == "relu_pool_net":
        kinds = [n.op.kind for n in pg.nodes]
        assert kinds[:6] == ["conv", "bias", "maxpool", "act", "conv", "bias"]
        assert kinds[6:8] == ["maxpool", "act"]
        # relu3 is read by pool3 and by the join: it stays before its pool
        assert pg.node("pool3").inputs == ["relu3"]
        # states are the pooled maps
        shapes = {s.name: tuple(s.shape) for s in eg.states}
        plain = {s.name: tuple(s.shape) for s in compile_(ff).states}
        assert sorted(shapes.values()) != sorted(plain.values())
        assert (4, 5, 5) in shapes.values() and (4, 9, 9) in plain.values()


def test_bn_folds_into_conv_and_dense():
    cg = canonicalize.run(resnet(), CompileOptions())
    kinds = [n.op.kind for n in cg.nodes]
    assert "chanscale" not in kinds and "batchnorm" not in kinds
    # the projection's BN became its conv's bias; b1c2 gained a bias from b1bn2
    proj = cg.node("projbn")
    assert isinstance(proj.op, Bias) and cg.node(proj.inputs[0]).op.kind == "conv"
    cg = canonicalize.run(mlp(), CompileOptions())
    assert [n.op.kind for n in cg.nodes] == ["dense", "bias", "act", "dense", "bias", "act",
                                             "dense", "bias"]


def test_bn_after_add_becomes_channel_scale():
    cg = canonicalize.run(bn_after_add(), CompileOptions())
    bn = cg.node("bn")
    assert isinstance(bn.op, Bias)
    assert isinstance(cg.node(bn.inputs[0]).op, ChannelScale)
    eg = to_energy.run(cg, CompileOptions())
    r2 = [c for c in eg.couplings if c.dst == "h2"]
    assert len(r2) == 2 and all(isinstance(c.ops[-1], ChannelScale) for c in r2)


def test_fold_leaves_shared_weight_alone():
    """A BN after a conv whose weight another conv also uses rescales a private copy."""
    b = Builder("shared", (2, 5, 5), seed=8)
    b.conv("c1", 2, bias=False)
    b.bn("bn1")
    r1 = b.act("r1")
    b.node("c2", Conv("c1.weight", [1, 1], [1, 1, 1, 1]), [r1])
    b.act("r2")
    b.node("flat", Flatten())
    b.dense("fc", 3)
    ff = b.done()
    cg = canonicalize.run(ff, CompileOptions())
    assert cg.node("c2").op.weight == "c1.weight"
    assert cg.node("c1").op.weight != "c1.weight"
    np.testing.assert_array_equal(cg.weights["c1.weight"], ff.weights["c1.weight"])
    x = random_input(ff)
    assert rel_err(run_feedforward(cg, x)["fc_b"], run_feedforward(ff, x)["fc_b"]) < 1e-6


def test_fold_blocked_by_second_consumer():
    """BN after a conv whose output is also read elsewhere cannot be folded."""
    b = Builder("twice", (2, 5, 5), seed=9)
    c = b.conv("c1", 2, bias=False)
    b.bn("bn1")
    b.node("add", Add(), ["bn1", c])
    b.act("r1")
    b.node("flat", Flatten())
    b.dense("fc", 3)
    ff = b.done()
    cg = canonicalize.run(ff, CompileOptions())
    assert any(isinstance(n.op, ChannelScale) for n in cg.nodes)
    x = random_input(ff)
    assert rel_err(run_feedforward(cg, x)["fc_b"], run_feedforward(ff, x)["fc_b"]) < 1e-6
    eg = compile_(ff)
    assert rel_err(forward_sweep(eg, x)["out"], run_feedforward(ff, x)["fc_b"]) < 1e-6


def test_to_energy_states_and_biases():
    eg = to_energy.run(canonicalize.run(convnet(), CompileOptions()), CompileOptions())
    # states are h1..hN in feedforward order (relu1 -> h1, relu2 -> h2), readout 'out'
    assert [s.name for s in eg.states] == ["h1", "h2", "out"]
    assert not eg.nodes and not eg.outputs
    h2 = eg.state("h2")
    assert h2.act == Activation.clip(0.0, 1.0) and h2.source_act == RELU
    # conv bias pushed through the max-pool stays per channel: [C, 1, 1]
    assert eg.weights[h2.bias].shape == (6, 1, 1)
    (c,) = eg.inbound("h2")
    assert [op.kind for op in c.ops] == ["conv", "maxpool"]
    out = eg.output_state()
    assert out.role == "output" and out.act.kind == "identity"
    # pooling, flatten and dense compose into one chain from h2 to the output
    assert [op.kind for op in eg.inbound("out")[0].ops] == ["avgpool", "flatten", "dense"]
    assert [(k.kind, k.target, k.weight) for k in eg.costs] == [("mse", "label", 1.0)]


def test_constants_compose_through_linear_ops():
    eg = compile_(affine_chain())
    r1 = eg.state("h1")
    # the padded conv makes the constant vary over positions: stored in full shape
    assert eg.weights[r1.bias].shape == (3, 3, 3)
    assert not np.allclose(eg.weights[r1.bias], eg.weights[r1.bias][:, :1, :1])
    (c,) = eg.inbound("out")
    assert [op.kind for op in c.ops] == ["flatten", "dense", "dense"]


def test_output_nonlinearity_is_the_output_state():
    b = Builder("actout", (4,), seed=10)
    b.dense("fc", 3)
    b.act("sig", Activation.hardsigmoid())
    eg = compile_(b.done())
    out = eg.output_state()
    assert out.name == "out" and out.act.kind == "hardsigmoid"


def test_options_activation_and_neuron():
    eg = compile_(mlp(), activation=Activation.clip(0.0, 0.5), neuron="bernoulli", cost="ce")
    hidden = [s for s in eg.states if s.role == "hidden"]
    assert hidden and all(s.act == Activation.clip(0.0, 0.5) for s in hidden)
    assert all(s.neuron == "bernoulli" for s in hidden)
    assert eg.output_state().neuron == "rate"      # a linear readout has no firing probability
    assert eg.costs[0].kind == "ce"
    assert eg.schedule.spiking is not None


@pytest.mark.parametrize("act", [Activation.clip(0.0, 2.0), Activation.clip(-1.0, 1.0),
                                 Activation.relu()])
def test_bernoulli_needs_a_probability(act):
    """A bernoulli neuron fires with probability rho(u): an activation outside [0, 1]
    (unbounded, or bounded past 1 or below 0) is refused, naming the state."""
    with pytest.raises(EpcError, match=r"state h1: --neuron bernoulli needs a firing "
                                       r"probability"):
        compile_(mlp(), activation=act, neuron="bernoulli")


# =========================================================================== symmetrize
def test_symmetrize_feedback():
    eg = compile_(resnet())
    states = {s.name for s in eg.states}
    for c in eg.couplings:
        assert c.feedback == (c.src in states)
    eg = compile_(resnet(), feedback=False)
    assert not any(c.feedback for c in eg.couplings)


# =========================================================================== residual
def test_residual_marks_skips():
    eg = compile_(resnet())
    # resnet states: stem_relu -> h1, b1r1 -> h2, b1out -> h3, b2r1 -> h4, b2out -> h5
    kinds = {(c.src, c.dst): c.kind for c in eg.couplings}
    assert kinds[("h2", "h3")] == "forward"
    assert kinds[("h1", "h3")] == "residual"
    assert kinds[("h4", "h5")] == "forward"
    assert kinds[("h3", "h5")] == "residual"
    ident = eg.coupling([c.name for c in eg.couplings if c.src == "h1"
                         and c.dst == "h3"][0])
    assert len(ident.ops) == 1 and isinstance(ident.ops[0], Identity)
    proj = [c for c in eg.couplings if c.src == "h3" and c.dst == "h5"][0]
    assert [op.kind for op in proj.ops] == ["conv"]
    for s in eg.settled_states():
        inb = [c for c in eg.inbound(s.name) if c.kind in ("forward", "residual")]
        if inb:
            assert sum(c.kind == "forward" for c in inb) == 1


def test_learned_identity_skip_is_identity_at_init():
    eg = compile_(resnet(), identity_skip="learned")
    skip = [c for c in eg.couplings if c.src == "h1" and c.dst == "h3"][0]  # stem -> block 1
    assert skip.kind == "residual" and isinstance(skip.ops[0], Conv)
    w = eg.weights[skip.ops[0].weight]
    np.testing.assert_array_equal(w[:, :, 0, 0], np.eye(4))
    eg = compile_(chain_skip(3, 1, 3), identity_skip="learned")
    skip = [c for c in eg.couplings if c.kind == "residual"][0]
    assert isinstance(skip.ops[0], Dense)
    np.testing.assert_array_equal(eg.weights[skip.ops[0].weight], np.eye(6))


def test_skip_gain_scales_the_skips_between_states():
    """--skip-gain G: an identity skip becomes a learned map G*I, a projection skip's weight
    is G times the gain-1 one, the main paths keep theirs, and the skip's output is G
    times what it was."""
    one, half = compile_(resnet()), compile_(resnet(), skip_gain=0.5)
    ident = [c for c in half.couplings if c.src == "h1" and c.dst == "h3"][0]
    assert ident.kind == "residual" and isinstance(ident.ops[0], Conv)
    np.testing.assert_array_equal(half.weights[ident.ops[0].weight][:, :, 0, 0],
                                  0.5 * np.eye(4))
    for c in half.couplings:
        c1 = one.coupling(c.name)
        if c.kind == "residual" and c.name != ident.name:            # the projection
            np.testing.assert_array_equal(half.weights[c.ops[0].weight],
                                          0.5 * one.weights[c1.ops[0].weight])
        elif c.kind == "forward":
            for op, op1 in zip(c.ops, c1.ops):
                if getattr(op, "weight", None):
                    np.testing.assert_array_equal(half.weights[op.weight],
                                                  one.weights[op1.weight])
    # the skip's output: G times the identity's / the projection's at gain 1
    import torch
    from epc.runtime import kernels as K
    x = torch.rand(2, *half.shape_of(ident.src), dtype=torch.float64)
    P1 = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in one.weights.items()}
    P2 = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in half.weights.items()}
    for c in half.couplings:
        if c.kind == "residual":
            xs = torch.rand(2, *half.shape_of(c.src), dtype=torch.float64)
            y1 = K.chain_forward(one.coupling(c.name).ops, xs, P1)[0]
            y2 = K.chain_forward(c.ops, xs, P2)[0]
            torch.testing.assert_close(y2, 0.5 * y1)
    # 1-D states: a dense map; skips from an input keep their gain
    eg = compile_(chain_skip(3, 1, 3), skip_gain=0.25)
    skip = [c for c in eg.couplings if c.kind == "residual"][0]
    np.testing.assert_array_equal(eg.weights[skip.ops[0].weight], 0.25 * np.eye(6))
    with pytest.raises(EpcError, match="skip gain"):
        compile_(resnet(), skip_gain=0.0)


def test_same_source_twice():
    """Add(dense(h), h): both couplings come from h; the weighted one is the main path."""
    b = Builder("same_src", (4,), seed=11)
    b.dense("fc1", 4)
    h = b.act("h1")
    b.dense("fc2", 4)
    b.node("add", Add(), [b.last, h])
    b.act("h2")
    b.dense("out", 2)
    eg = compile_(b.done())
    inb = {c.kind: c for c in eg.inbound("h2")}
    assert set(inb) == {"forward", "residual"} and isinstance(inb["forward"].ops[0], Dense)


# =========================================================================== schedule
def _check_colouring(eg: Graph):
    col = {n: k for k, cls in enumerate(eg.schedule.classes) for n in cls}
    assert sorted(col) == sorted(s.name for s in eg.settled_states())
    for c in eg.couplings:
        if c.src in col and c.dst in col:
            assert col[c.src] != col[c.dst], c.name
    return col


def test_schedule_chain_is_two_colour_and_input_first():
    eg = compile_(mlp(depth=4))
    col = _check_colouring(eg)
    assert len(eg.schedule.classes) == 2
    assert col["h1"] == 0             # the class that sees the input goes first
    assert eg.schedule.classes[0] == ["h1", "h3", "out"]


def test_schedule_skip_over_two_layers_needs_three_colours():
    # h1 -> h2 -> h3 plus the skip h1 -> h3: a triangle, parity colouring would be wrong
    eg = compile_(chain_skip(4, 1, 3))
    _check_colouring(eg)
    assert len(eg.schedule.classes) == 3
    assert not nx.is_bipartite(schedule.interaction_graph(eg))
    eg = compile_(resnet())
    _check_colouring(eg)
    assert len(eg.schedule.classes) >= 3
    # a skip over three layers closes an even cycle: two colours still suffice
    eg = compile_(chain_skip(5, 1, 4))
    _check_colouring(eg)
    assert len(eg.schedule.classes) == 2


def test_schedule_options():
    eg = compile_(resnet(), schedule="sync", max_sweeps=7, nudge_sweeps=3, tol=1e-6)
    s = eg.schedule
    assert (s.mode, s.max_sweeps, s.nudge_sweeps, s.tol) == ("sync", 7, 3, 1e-6)
    _check_colouring(eg)
    with pytest.raises(EpcError, match="schedule"):
        compile_(mlp(), schedule="random")


# =========================================================================== taps
def test_taps_auto_rule():
    assert compile_(mlp(depth=2), taps="auto").costs == compile_(mlp(depth=2)).costs
    eg = compile_(mlp(depth=6, width=6), taps="auto")
    tapped = [c.src for c in eg.couplings if c.kind == "tap"]
    assert tapped == ["h5", "h3", "h1"]
    eg = compile_(mlp(depth=12, width=4), taps="auto")
    assert len([s for s in eg.states if s.role == "tap"]) == 4


def test_taps_heads_and_costs():
    # b1r1 -> h2, b2r1 -> h4 (the first conv+relu of each residual block)
    eg = compile_(resnet(), taps=["h2", "h4"], tap_weight=0.25, cost="ce")
    for h in ("h2", "h4"):
        tap = eg.state(f"tap_{h}")
        assert tap.role == "tap" and tap.shape == (5,) and tap.bias
        (c,) = [c for c in eg.couplings if c.dst == tap.name]
        assert c.src == h and c.kind == "tap" and c.feedback
        assert [op.kind for op in c.ops] == ["gavgpool", "dense"]
        w = eg.weights[c.ops[-1].weight]
        assert w.shape == (5, eg.state(h).shape[0])
        assert np.all(np.abs(w) <= 1 / np.sqrt(w.shape[1]))
        (cost,) = [k for k in eg.costs if k.state == tap.name]
        assert (cost.kind, cost.target, cost.weight) == ("ce", "label", 0.25)
    # deterministic: same weights on a second compile
    again = compile_(resnet(), taps=["h2", "h4"], tap_weight=0.25, cost="ce")
    for k, v in eg.weights.items():
        np.testing.assert_array_equal(v, again.weights[k])


def test_taps_unknown_state_lists_states():
    with pytest.raises(EpcError) as e:
        compile_(mlp(), taps=["nope"])
    assert "nope" in str(e.value) and "h1, h2" in str(e.value)


# =========================================================================== teacher
def test_teacher_source_is_exact_copy():
    ff = mobile()
    eg = compile_(ff, teacher="source", teacher_mix=0.3, teacher_temperature=2.0)
    t = eg.teacher
    assert (t.source, t.temperature, t.mix) == ("source", 2.0, 0.3)
    tstates = [s for s in eg.states if s.role == "teacher"]
    assert tstates and all(s.name.startswith("teacher.") for s in tstates)
    assert all(s.act == s.source_act for s in tstates)
    tcoup = [c for c in eg.couplings if c.kind == "teacher"]
    assert tcoup and not any(c.feedback for c in tcoup)
    tweights = {w for c in tcoup for op in c.ops for w in dataclasses.asdict(op).values()
                if isinstance(w, str)}
    assert tweights and all(w.startswith("teacher.") for w in tweights)
    costs = {k.name: k for k in eg.costs}
    assert costs["label"].weight == pytest.approx(0.7)
    d = costs["distill"]
    assert (d.kind, d.target, d.weight, d.temperature) == ("kl", t.output, 0.3, 2.0)
    x = random_input(ff, scale=4.0)
    vals = forward_sweep(eg, x, lift_bounds=False)   # teacher uses act == source model
    assert rel_err(vals[t.output], ff_logits(ff, x)) < 1e-6
    assert all(s.name not in (eg.schedule.classes[0] + eg.schedule.classes[-1])
               for s in tstates)
    # teacher weights are frozen: not counted as learnable
    assert eg.num_parameters() == compile_(ff).num_parameters()


def test_teacher_from_other_model_and_shape_checks():
    student, other = mlp(), mlp(depth=3, width=7)
    opts = CompileOptions(teacher="teacher.onnx", teacher_graph=other)
    eg = PassManager(build_pipeline(opts)).run(student, opts)
    assert eg.teacher.source == "teacher.onnx"
    x = random_input(student)
    assert rel_err(forward_sweep(eg, x)[eg.teacher.output], ff_logits(other, x)) < 1e-6
    b = Builder("wrong_out", (16,))
    b.dense("fc", 4)
    opts = CompileOptions(teacher="t.onnx", teacher_graph=b.done())
    with pytest.raises(EpcError, match="teacher output"):
        PassManager(build_pipeline(opts)).run(student, opts)
    b = Builder("wrong_in", (8,))
    b.dense("fc", 5)
    opts = CompileOptions(teacher="t.onnx", teacher_graph=b.done())
    with pytest.raises(EpcError, match="teacher inputs"):
        PassManager(build_pipeline(opts)).run(student, opts)
    opts = CompileOptions(teacher="source")
    with pytest.raises(EpcError, match="no teacher model"):
        PassManager(build_pipeline(opts)).run(student, opts)


# =========================================================================== invariants
ALL_OPTS = [{}, {"taps": "auto", "identity_skip": "learned"},
            {"teacher": "source", "taps": "auto", "schedule": "sync"}]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kw", range(len(ALL_OPTS)))
def test_every_pass_verifies_roundtrips_and_is_pure(name, kw):
    ff = MODELS[name]()
    opts = CompileOptions(**ALL_OPTS[kw])
    if opts.teacher == "source":
        opts.teacher_graph = ff.copy()
    g = ff
    for p in build_pipeline(opts):
        before = print_graph(g)
        new = p.fn(g, opts)
        assert print_graph(g) == before, f"{p.name} mutated its input"
        assert new is not g
        assert problems(new) == [], (p.name, problems(new))
        text = print_graph(new)
        assert print_graph(parse(text)) == text, p.name
        g = new
    _check_colouring(g)
    assert g.is_energy and not g.nodes and not g.outputs


# =========================================================================== errors
def test_maxpool_after_residual_add_is_refused():
    with pytest.raises(EpcError) as e:
        compile_(maxpool_after_add())
    assert "pool" in str(e.value) and "maxpool" in str(e.value)


def test_pool_first_leaves_a_pool_after_a_residual_join_behind_its_activation():
    """add -> relu -> maxpool: the pool stays after the activation (a max-pool of a sum has
    no coupling form), and the graph compiles as without the option."""
    b = Builder("join_relu_pool", (2, 6, 6), seed=4)
    c1 = b.conv("c1", 2, bias=False)
    b.conv("c2", 2, bias=False, src="x")
    b.node("add", Add(), [c1, "c2"])
    b.act("relu")
    b.node("pool", MaxPool([2, 2], [2, 2]))
    b.node("flat", Flatten())
    b.dense("fc", 3)
    ff = b.done()
    assert print_graph(compile_(ff, pool_first=True)) == print_graph(compile_(ff))


def test_softmax_inside_is_refused():
    b = Builder("inner_softmax", (4,))
    b.dense("fc", 3)
    b.node("sm", Softmax())
    b.dense("fc2", 2)
    with pytest.raises(EpcError, match="node sm"):
        compile_(b.done())


def test_energy_graph_is_refused_by_canonicalize():
    eg = compile_(mlp())
    with pytest.raises(EpcError, match="energy form"):
        canonicalize.run(eg, CompileOptions())


# =========================================================================== conditions
def test_preconditions_name_the_graph_and_the_pass():
    eg = compile_(mlp())
    with pytest.raises(EpcError, match="^graph mlp: canonicalize: needs a feedforward graph, "
                                       "this one is already in energy form$"):
        run_passes(eg, ["canonicalize"])
    with pytest.raises(EpcError, match="^graph mlp: symmetrize: needs an energy-form graph"):
        run_passes(mlp(), ["symmetrize"])
    with pytest.raises(EpcError, match=r"^graph mlp: to_energy: node bn1 \(batchnorm\) is not "
                                       r"canonical \(run canonicalize first\) \(and 2 more\)$"):
        run_passes(mlp(), ["to_energy"])
    ff = canonicalize.run(mlp(), CompileOptions())
    ff.outputs.append(ff.outputs[0])
    with pytest.raises(EpcError, match="to_energy: 2 outputs; epc compiles models with exactly"):
        run_passes(ff, ["to_energy"])
    weightless = parse(print_graph(mlp(), weights="shapes"))
    with pytest.raises(EpcError, match="canonicalize: weight bn1.mean is declared without data"):
        run_passes(weightless, ["canonicalize"])
    looped = compile_(mlp())
    looped.couplings[0].src = "h2"          # h2 -> h1 -> h2
    with pytest.raises(EpcError, match="residual: its forward and residual couplings form a "
                                       "cycle"):
        run_passes(looped, ["residual"])
    with pytest.raises(EpcError, match="teacher: already has teacher teacher"):
        run_passes(compile_(mlp(), teacher="source"), ["teacher"],
                   CompileOptions(teacher="t.onnx", teacher_graph=mlp()))


def _sabotaged(name: str):
    """The pass `name` with its transform broken the way a bug would break it."""
    p = PASSES[name]

    def feedback_off(g):
        c = next(c for c in g.couplings if c.feedback)
        c.feedback = False
        return g

    def mark_teacher_feedback(g):
        next(c for c in g.couplings if c.kind == "teacher"
             and c.src.startswith("teacher.")).feedback = True
        return g

    def output_not_readout(g):
        g.output_state().readout = False
        return g

    def forward_becomes_residual(g):
        next(c for c in g.couplings if c.kind == "forward" and c.dst == "h3").kind = "residual"
        return g

    def input_class_last(g):        # still a colouring, so only the postcondition sees it
        g.schedule.classes.reverse()
        return g

    def feedback_on(g):
        next(c for c in g.couplings if c.src != "x").feedback = True
        return g

    def drop_last_cost(g):
        g.costs.pop()
        return g

    breaks = {"canonicalize": lambda g: g, "pool_first": lambda g: g,
              "to_energy": feedback_on, "symmetrize": feedback_off,
              "residual": forward_becomes_residual, "taps": drop_last_cost,
              "teacher": mark_teacher_feedback, "readout": output_not_readout,
              "schedule": input_class_last}
    broken = (lambda g, o: g.copy()) if name in ("canonicalize", "pool_first") else \
        (lambda g, o: breaks[name](p.fn(g, o)))
    return dataclasses.replace(p, fn=broken)


@pytest.mark.parametrize("name", PASS_NAMES)
def test_postconditions_catch_a_broken_pass(name):
    """Each pass's ensures holds for the real pass and fails for a broken one."""
    ff = resnet() if name == "residual" else relu_pool_net() if name == "pool_first" \
        else mlp(depth=4, width=6)
    opts = CompileOptions(pool_first=True, taps="auto", teacher="source", readout=True,
                          cost="ce", teacher_graph=ff.copy())
    g = ff
    for p in build_pipeline(opts):
        if p.name == name:
            break
        g = p.run(g, opts)
    PASSES[name].run(g, opts)                                   # the real one: no error
    with pytest.raises(EpcError, match=f"^internal error: pass {name} broke its "
                                       f"postcondition: "):
        _sabotaged(name).run(g, opts)


# =========================================================================== run_passes
def test_run_passes_runs_what_it_is_told():
    ff = mlp()
    before = print_graph(ff)
    whole = run_passes(ff, None, CompileOptions(taps="auto"))
    assert print_graph(whole) == print_graph(compile_(mlp(), taps="auto"))
    assert print_graph(ff) == before                            # the input is untouched
    cg = run_passes(ff, ["canonicalize"])
    assert print_graph(cg) == print_graph(canonicalize.run(ff, CompileOptions()))
    eg = run_passes(print_graph(cg, weights="inline"), ["to_energy", "schedule"])
    assert eg.schedule and not any(c.feedback for c in eg.couplings)   # no symmetrize
    with pytest.raises(EpcError, match="^unknown pass 'fold' \\(passes: canonicalize, "):
        run_passes(ff, ["fold"])
    with pytest.raises(EpcError, match="^pass pool_first is off under these options: it "
                                       "runs with --pool-first$"):
        run_passes(ff, ["canonicalize", "pool_first"])
    with pytest.raises(EpcError, match="--teacher source takes the input as the teacher and "
                                       "needs it feedforward"):
        run_passes(eg, ["teacher"], CompileOptions(teacher="source"))
    t = run_passes(ff, ["canonicalize", "to_energy", "teacher"],
                   CompileOptions(teacher="source"))
    assert t.teacher.source == "source" and t.teacher.output.startswith("teacher.")


def test_opt_text_prints_the_result():
    text = print_graph(mlp(), weights="inline")
    out = opt_text(text, ["canonicalize"])
    assert out == print_graph(canonicalize.run(parse(text), CompileOptions()))
    inline = opt_text(text, ["canonicalize"], weights="inline")
    assert print_graph(parse(inline), weights="inline") == inline
    with pytest.raises(EpcError, match="^t.epir:1:1: expected the header"):
        opt_text("graph g {}\n", ["canonicalize"], source_name="t.epir")
