"""The frontend Builder (frontends/builder.py): what one call makes, how finish() folds and
names, and that both frontends' output is already canonical.

The agreement of the two frontends on real models is tested in test_frontends_agree.py;
here the Builder is driven directly (as a frontend does, one `at()` per source op) and
through small hand-built ONNX graphs.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from epc.compiler.errors import EpcError
from epc.compiler.ir import Act, Activation
from epc.compiler.options import CompileOptions
from epc.compiler.passes import canonicalize
from epc.compiler.reference import run_feedforward
from epc.compiler.text import print_graph
from epc.frontends.builder import Builder
from epc.frontends.onnx import _scope, load_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ["mlp_digits", "mlp3_digits", "conv_digits", "conv1_digits", "conv_digits_teacher",
            "vgg_cifar", "resnet13", "hopfield_resnet13", "mobilenet_cifar"]


def builder() -> Builder:
    b = Builder("net", {"frontend": "test"})
    b.at("", lambda msg: EpcError(f"op: {msg}"))
    return b


def at(b: Builder, scope: str) -> None:
    b.at(scope, lambda msg: EpcError(f"{scope}: {msg}"))


def kinds(g) -> list[str]:
    return [n.op.kind for n in g.nodes]


# --------------------------------------------------------------------------- what a call makes
def test_ops_that_compute_nothing_add_no_node():
    b = builder()
    x = b.input("x", (4, 3, 3))
    assert b.reshape(x, (4, 3, 3)) is x
    assert b.clamp(x, None, np.inf) is x
    assert b.mul_constant(x, np.ones((4, 1, 1))) is x
    assert b.adaptive_avgpool(x, (3, None)) is x
    assert b.add([x]) is x
    v = b.flatten(x)
    assert b.flatten(v) is v and b.reshape(v, (36,)) is v
    b.output(v)
    assert kinds(b.finish()) == ["flatten"]


def test_constants_are_stored_per_channel_when_uniform():
    b = builder()
    x = b.input("x", (2, 2, 3))
    y = b.add_constant(x, np.array([[[1.0]], [[2.0]]]))            # per channel
    y = b.add_constant(y, np.arange(12.0).reshape(1, 2, 2, 3))     # batch axis of 1, full
    z = b.mul_constant(y, 3.0)                                      # a scalar is per channel
    b.output(b.add_constant(z, 0.0))                                # a zero bias is kept
    g = b.finish()
    # two biases in a row merge into one full-shape bias; the zero bias stays
    assert kinds(g) == ["bias", "chanscale", "bias"]
    shapes = [g.weights[n.op.weight].shape for n in g.nodes]
    assert shapes == [(2, 2, 3), (2,), (2, 1, 1)]
    assert not np.any(g.weights[g.nodes[2].op.weight])


@pytest.mark.parametrize("call, needle", [
    (lambda b, x: b.mul_constant(x, np.arange(12.0).reshape(2, 2, 3)), "varies within"),
    (lambda b, x: b.mul_constant(x, np.zeros((2, 1, 1)), divide=True), "containing zero"),
    (lambda b, x: b.add_constant(x, np.zeros((3, 2, 2, 3))), "batch axis"),
    (lambda b, x: b.add_constant(x, np.zeros((5,))), "does not broadcast"),
    (lambda b, x: b.dense(x, np.zeros((3, 12))), "flatten it first"),
    (lambda b, x: b.clamp(x, 1.0, None), "only a lower bound"),
    (lambda b, x: b.clamp(x, 2.0, 1.0), "min <= max"),
    # a reshape to a rank no op takes is refused where it is read, naming the reshape
    (lambda b, x: b.relu(b.reshape(x, (3, 4))), "only flattening and permutations"),
    (lambda b, x: b.transpose(x, [0, 0, 1]), "transpose [0, 0, 1]"),
    (lambda b, x: b.avgpool(x, [2, 2], [1, 1], [1, 0, 0, 0], ceil_mode=True), "asymmetric"),
    (lambda b, x: b.concat([x, x], 1), "only along the channels"),
    (lambda b, x: b.slice(x, 0, 2, 2), "is empty"),
    (lambda b, x: b.softmax(x), "classes"),
])
def test_refusals_go_through_the_frontends_hook(call, needle):
    b = builder()
    x = b.input("x", (2, 2, 3))
    at(b, "blk.op")
    with pytest.raises(EpcError) as e:
        call(b, x)
    assert str(e.value).startswith("blk.op: ") and needle in str(e.value)


# --------------------------------------------------------------------------- finish()
def test_upper_clamp_fuses_into_the_relu_before_it():
    b = builder()
    x = b.input("x", (4,))
    at(b, "act")
    r = b.relu(x)
    at(b, "act")
    b.output(b.clamp(r, None, 6.0))
    g = b.finish()
    assert [n.op for n in g.nodes] == [Act(Activation.clip(0.0, 6.0))]
    # an upper bound alone anywhere else is refused, naming the op it came from
    b = builder()
    x = b.input("x", (4,))
    r = b.relu(x)
    at(b, "cap")
    b.output(b.add([b.clamp(r, None, 6.0), r]))    # the relu has a second reader
    with pytest.raises(EpcError, match="^cap: clamp with only an upper bound 6.0"):
        b.finish()


def test_softmax_only_at_the_output():
    b = builder()
    x = b.input("x", (4,))
    at(b, "sm")
    s = b.softmax(x)
    at(b, "after")
    b.output(b.relu(s))
    with pytest.raises(EpcError, match="^sm: softmax that is not the model's output"):
        b.finish()


def test_batchnorm_and_scale_fold_into_the_linear_op_before_them():
    import torch
    rng = np.random.default_rng(0)
    w, bias = rng.normal(size=(3, 2, 3, 3)), rng.normal(size=3)
    scale, shift = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    wd, gain, shift2 = rng.normal(size=(4, 75)), rng.normal(size=4), rng.normal(size=4)
    b = builder()
    x = b.input("x", (2, 5, 5))
    at(b, "conv")
    y = b.conv(x, w, bias, stride=[1, 1], pads=[1, 1, 1, 1], dilation=[1, 1],
               name="conv.weight")
    at(b, "bn")
    y = b.batchnorm(y, scale, shift, mean, var, 1e-5)
    at(b, "relu")
    y = b.relu(y)
    at(b, "")
    y = b.flatten(y)
    at(b, "fc")
    y = b.dense(y, wd, name="fc.weight")
    at(b, "affine")
    b.output(b.add_constant(b.mul_constant(y, gain), shift2))
    g = b.finish()
    assert [(n.name, n.op.kind) for n in g.nodes] == [
        ("conv", "conv"), ("conv_bias", "bias"), ("relu", "act"), ("flatten", "flatten"),
        ("fc", "dense"), ("fc_bias", "bias")]
    assert sorted(g.weights) == ["conv.bias", "conv.weight", "fc.bias", "fc.weight"]
    # the same function as the unfolded chain (in float64, from the float32 parameters)
    t = lambda a: torch.as_tensor(np.float32(a), dtype=torch.float64)  # noqa: E731
    c = lambda a: t(a).reshape(1, 3, 1, 1)  # noqa: E731
    xs = rng.normal(size=(2, 2, 5, 5))
    u = torch.nn.functional.conv2d(torch.as_tensor(xs), t(w), t(bias), padding=1)
    u = torch.relu((u - c(mean)) / torch.sqrt(c(var) + 1e-5) * c(scale) + c(shift))
    want = ((u.flatten(1) @ t(wd).T) * t(gain) + t(shift2)).numpy()
    got = run_feedforward(g, {"x": xs})["fc_bias"]
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_names_come_from_scopes():
    """Leaf scopes name their node, container scopes get '.<kind>', the root '<kind>';
    a Conv/Dense is named after its '<path>.weight', its bias after it; repeats get _1."""
    rng = np.random.default_rng(1)
    b = builder()
    x = b.input("input", (2, 4, 4))
    at(b, "blk.conv")
    y = b.conv(x, rng.normal(size=(2, 2, 1, 1)), rng.normal(size=2), stride=[1, 1],
               pads=[0, 0, 0, 0], dilation=[1, 1], name="blk.conv.weight")
    at(b, "blk")                          # functional ops in the block's forward
    a = b.relu(y)
    a = b.add([a, x])
    a = b.relu(a)
    at(b, "blk.act")                       # one module called twice
    a = b.clamp(b.clamp(a, -1.0, 1.0), -0.5, 0.5)
    at(b, "blk.scale")
    a = b.mul_constant(a, np.array([[[2.0]], [[3.0]]]))
    at(b, "")
    b.output(b.global_avgpool(a, keepdims=False))
    g = b.finish()
    assert [n.name for n in g.nodes] == [
        "blk.conv", "blk.conv_bias", "blk.relu", "blk.add", "blk.relu_1", "blk.act",
        "blk.act_1", "blk.scale", "gavgpool"]
    assert sorted(g.weights) == ["blk.conv.bias", "blk.conv.weight", "blk.scale.scale"]


# --------------------------------------------------------------------------- ONNX side
@pytest.mark.parametrize("node_name, scope", [
    ("/stages/stages.0/conv1/Conv", "stages.0.conv1"),
    ("/stages/stages.0/Relu_1", "stages.0"),
    ("/3/dw/dw.0/Conv", "3.dw.0"),
    ("/layers/layers.0/relu_1/Relu", "layers.0.relu_1"),
    ("/Flatten", ""),
    ("conv/0", "conv/0"),
])
def test_onnx_scope_of_legacy_names(node_name, scope):
    assert _scope(helper.make_node("Relu", ["a"], ["b"], name=node_name)) == scope


def test_onnx_scope_of_dynamo_metadata():
    n = helper.make_node("Relu", ["a"], ["b"], name="node_relu_3")
    p = n.metadata_props.add()
    p.key, p.value = "pkg.torch.onnx.name_scopes", "['', 'stages', 'stages.1', 'relu_3']"
    assert _scope(n) == "stages.1"
    n = helper.make_node("Relu", ["a"], ["b"], name="")
    assert _scope(n) == "b"


def test_onnx_relu_then_upper_clip_is_one_clip(tmp_path):
    """A ReLU6 spelled Relu + Clip(max=6) (ONNX from other tools) becomes one clip(0, 6),
    as the PyTorch frontend does for clamp(relu(x), max=6); a Clip with only a max
    elsewhere is refused by name."""
    def model(first):
        nodes = [helper.make_node(first, ["x"], ["r"], name="first"),
                 helper.make_node("Clip", ["r", "", "hi"], ["y"], name="cap")]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, ["N", 4])], [helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, ["N", 4])],
            [numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model("Relu"), str(tmp_path / "relu6.onnx"))
    g = load_onnx(str(tmp_path / "relu6.onnx"))
    assert [n.op for n in g.nodes] == [Act(Activation.clip(0.0, 6.0))]
    onnx.save(model("Identity"), str(tmp_path / "cap.onnx"))
    with pytest.raises(EpcError, match="unsupported Clip node 'cap'.*only an upper bound"):
        load_onnx(str(tmp_path / "cap.onnx"))


@pytest.mark.parametrize("name", EXAMPLES)
def test_frontend_output_is_already_canonical(name):
    """canonicalize changes nothing in what a frontend produces but the output Softmax it
    drops (the examples have none): the frontends fold with its rewrites."""
    g = load_onnx(os.path.join(ROOT, "examples", name + ".onnx"))
    assert print_graph(canonicalize.run(g, CompileOptions())) == print_graph(g)
