"""ONNX frontend: imports real exported models and refuses bad input cleanly.

References: onnxruntime (and the torch module itself) on random inputs, for models exported
on the fly from the common CNN families by the legacy TorchScript exporter at several opsets,
plus hand-built onnx graphs for folding, operator forms and every kind of bad input. The
dynamo exporter's forms are checked in test_frontends_agree.py (its exports are slow, so
they are made once there), against onnxruntime, PyTorch and the PyTorch frontend's IR.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from epc.compiler.errors import EpcError
from epc.compiler.ir import Act, Conv, Flatten, Softmax
from epc.compiler.options import CompileOptions
from epc.compiler.reference import run_feedforward
from epc.compiler.text import parse, print_graph
from epc.compiler.verify import problems
from epc.frontends.onnx import load_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "build_examples", os.path.join(ROOT, "examples", "build_examples.py"))
be = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(be)

RTOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def ort_run(path: str, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def ir_run(g, x: np.ndarray) -> np.ndarray:
    return run_feedforward(g, {g.inputs[0].name: x})[g.outputs[0]]


def check_against_ort(path: str, batch: int = 3, seed: int = 0):
    g = load_onnx(path)
    assert problems(g) == []
    x = np.random.default_rng(seed).uniform(-1, 2, (batch, *g.inputs[0].shape)).astype(np.float32)
    assert rel_err(ir_run(g, x), ort_run(path, x)) < RTOL
    return g, x


def save(model, path) -> str:
    onnx.save(model, str(path))
    return str(path)


# --------------------------------------------------------------------------- small families
def tiny_vgg():
    return be.vgg_cifar(widths=(8, 8, "M", 16, "M"), size=16)


def tiny_resnet():
    return be.ResNet(blocks=(1, 1), widths=(8, 16))


def tiny_mobilenet():
    return nn.Sequential(*be._conv_bn_relu(3, 8, relu6=True), be.DepthwiseSeparable(8, 16, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def tiny_mlp():
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 5))


FAMILIES = {
    "mlp": (tiny_mlp, (20,)),
    "vgg_bn": (tiny_vgg, (3, 16, 16)),
    "resnet_bn": (tiny_resnet, (3, 16, 16)),
    "mobilenet_relu6": (tiny_mobilenet, (3, 16, 16)),
}


def make(family: str, seed: int = 0):
    ctor, shape = FAMILIES[family]
    torch.manual_seed(seed)
    return be.warm_batchnorm(ctor(), shape, seed), shape


# --------------------------------------------------------------------------- examples
EXAMPLE_FILES = ["mlp_digits", "mlp3_digits", "conv_digits", "conv1_digits",
                 "conv_digits_teacher", "vgg_cifar", "resnet13", "hopfield_resnet13",
                 "mobilenet_cifar"]


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_imports_and_matches_onnxruntime(name):
    path = os.path.join(ROOT, "examples", name + ".onnx")
    g, _ = check_against_ort(path)
    assert g.attrs == {"source": path, "frontend": "onnx", "opset": "17"}
    assert g.name == name
    # the textual IR round-trips (names are identifiers, attributes printable)
    text = print_graph(g)
    assert print_graph(parse(text)) == text


# --------------------------------------------------------------------------- legacy exports
@pytest.mark.parametrize("family", list(FAMILIES))
def test_legacy_export_matches_ort_and_torch(family, tmp_path):
    model, shape = make(family)
    path = be.export_legacy(model, shape, str(tmp_path / f"{family}.onnx"))
    g, x = check_against_ort(path, batch=4)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert rel_err(ir_run(g, x), ref) < RTOL
    kinds = [n.op.kind for n in g.nodes]
    if family != "mlp":
        # the export keeps BatchNormalization nodes; the frontend folds each into its conv
        assert any(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)
        assert "batchnorm" not in kinds and "chanscale" not in kinds
        assert all(kinds[i + 1] == "bias" for i, k in enumerate(kinds) if k == "conv")
    if family == "resnet_bn":
        assert kinds.count("add") == 2
    if family == "mobilenet_relu6":
        acts = [n.op.fn for n in g.nodes if isinstance(n.op, Act)]
        assert all(a.kind == "clip" and (a.lo, a.hi) == (0.0, 6.0) for a in acts)
        assert any(isinstance(n.op, Conv) and n.op.groups == 8 for n in g.nodes)


def test_verify_runs_a_model_exported_with_a_fixed_batch_of_one(tmp_path):
    """torch.onnx.export without dynamic axes fixes the batch at the example's size (often
    1); --verify feeds several inputs, so it runs such a model one chunk at a time."""
    from epc.api import compile_source
    model, shape = make("vgg_bn")
    path = str(tmp_path / "fixed.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, *shape),), path, dynamo=False,
                          opset_version=17, input_names=["x"])
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1 and not dims[0].dim_param
    res = compile_source(path, CompileOptions(), verify_model=True)
    assert res.verify_error < RTOL


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
def test_opsets_of_the_legacy_exporter(opset, tmp_path):
    # Clip takes min/max as attributes before opset 11 and as inputs after; Dropout, Softmax,
    # Flatten change forms across these versions.
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU6(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 6), nn.Softmax(dim=1))
    torch.manual_seed(opset)
    model.eval()
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 2, 8, 8),), path, dynamo=False,
                          opset_version=opset, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    g, _ = check_against_ort(path)
    assert g.attrs["opset"] == str(opset)
    assert isinstance(g.node(g.outputs[0]).op, Softmax)
    assert any(isinstance(n.op, Act) and n.op.fn.kind == "clip" for n in g.nodes)


# --------------------------------------------------------------------------- hand-built graphs
def _model(nodes, inputs, outputs, inits=(), opset=17, name="g"):
    g = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    if any(not o.type.tensor_type.HasField("shape") for o in outputs):
        try:   # output types left open (None) are filled in by ONNX shape inference
            m = onnx.shape_inference.infer_shapes(m)
        except Exception:  # noqa: BLE001 - deliberately broken models keep what they have
            pass
    return m


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def test_constant_subgraphs_are_folded(tmp_path):
    """Constant / ConstantOfShape / Unsqueeze / Mul / Add / Cast / Shape / Gather / Concat /
    Reshape chains feeding weights and a flatten with a symbolic batch, as exporters emit."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(
            np.array(0.5, np.float32))),
        helper.make_node("Mul", ["w_raw", "half"], ["w"]),                       # weight fold
        helper.make_node("Constant", [], ["nc"], value=numpy_helper.from_array(
            np.array([4], np.int64))),
        helper.make_node("ConstantOfShape", ["nc"], ["b0"], value=numpy_helper.from_array(
            np.array([0.25], np.float32))),
        helper.make_node("Cast", ["b0"], ["b"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv/0"),
        helper.make_node("Relu", ["c"], ["r"], name="conv.0"),   # sanitizes to the same
        helper.make_node("Shape", ["r"], ["shp"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(
            np.array(0, np.int64))),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Constant", [], ["m1"], value=numpy_helper.from_array(
            np.array([-1], np.int64))),
        helper.make_node("Concat", ["n1", "m1"], ["target"], axis=0),
        helper.make_node("Reshape", ["r", "target"], ["flat"], name="view"),
        helper.make_node("MatMul", ["flat", "wfc"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "bfc"], ["y"], name="fc_bias"),
    ]
    inits = [_init("w_raw", 2 * w), _init("ax0", np.array([0], np.int64)),
             _init("wfc", rng.normal(size=(4 * 5 * 5, 3)).astype(np.float32)),
             _init("bfc", rng.normal(size=(3,)).astype(np.float32))]
    m = _model(nodes, [_vi("x", ["N", 2, 5, 5])], [_vi("y", ["N", 3])], inits)
    g, _ = check_against_ort(save(m, tmp_path / "fold.onnx"))
    assert [n.op.kind for n in g.nodes] == ["conv", "bias", "act", "flatten", "dense", "bias"]
    assert np.allclose(g.weights[g.nodes[0].op.weight], w)
    names = [n.name for n in g.nodes]
    assert len(set(names)) == len(names) and names[0] == "conv.0"


def test_operator_forms(tmp_path):
    """Gemm attributes, per-channel Mul/Div/Sub, HardSigmoid, Sum of three values, Clip,
    ReduceMean (axes as input at opset 18), LogSoftmax at the output."""
    rng = np.random.default_rng(1)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["a"]),
        helper.make_node("Sub", ["a", "shift"], ["b"]),
        helper.make_node("HardSigmoid", ["b"], ["h"], alpha=0.3, beta=0.4),
        helper.make_node("Div", ["x", "div"], ["d"]),
        helper.make_node("Clip", ["d", "lo", "hi"], ["c"]),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Sum", ["h", "c", "r"], ["s"], name="join"),
        helper.make_node("ReduceMean", ["s", "axes"], ["p"], keepdims=0),
        helper.make_node("Gemm", ["p", "B", "C"], ["z"], alpha=0.5, beta=2.0),
        helper.make_node("LogSoftmax", ["z"], ["y"], axis=-1),
    ]
    inits = [_init("scale", f(1, 3, 1, 1)), _init("shift", f(3, 1, 1)), _init("div", f(3, 1, 1)),
             _init("lo", np.array(-0.5, np.float32)), _init("hi", np.array(0.7, np.float32)),
             _init("axes", np.array([-2, -1], np.int64)), _init("B", f(3, 4)),
             _init("C", f(1, 4))]
    m = _model(nodes, [_vi("x", [2, 3, 4, 4])], [_vi("y", [2, 4])], inits, opset=18)
    g, _ = check_against_ort(save(m, tmp_path / "forms.onnx"), batch=2)
    kinds = [n.op.kind for n in g.nodes]
    assert kinds.count("chanscale") == 2 and "add" in kinds and "gavgpool" in kinds
    assert isinstance(g.node(g.outputs[0]).op, Softmax) and g.node(g.outputs[0]).op.log
    (hs,) = [n.op.fn for n in g.nodes if isinstance(n.op, Act) and n.op.fn.kind == "hardsigmoid"]
    assert (hs.alpha, hs.beta) == pytest.approx((0.3, 0.4))


def test_unsorted_acyclic_graph_is_sorted(tmp_path):
    nodes = [helper.make_node("Relu", ["a"], ["y"]), helper.make_node("Flatten", ["x"], ["a"])]
    m = _model(nodes, [_vi("x", ["N", 2, 3])], [_vi("y", ["N", 6])])
    path = tmp_path / "unsorted.onnx"
    path.write_bytes(m.SerializeToString())   # the checker alone would reject this order
    g, _ = check_against_ort(str(path))
    assert [n.op.kind for n in g.nodes] == ["flatten", "act"]
    assert isinstance(g.nodes[0].op, Flatten)


# --------------------------------------------------------------------------- bad input
def err(path) -> str:
    with pytest.raises(EpcError) as e:
        load_onnx(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _conv_model(**kw):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1"),
             helper.make_node("Relu", ["c"], ["y"], name="relu1")]
    return _model(nodes, [_vi("x", kw.get("xshape", ["N", 1, 4, 4]))],
                  [_vi("y", None)], [_init("w", kw.get("w", rng.normal(size=(2, 1, 3, 3))
                                                       .astype(np.float32)))],
                  opset=kw.get("opset", 17))


def test_missing_and_garbage_files(tmp_path):
    assert "no such file" in err(tmp_path / "nope.onnx")
    assert "not a file" in err(tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "empty.onnx" in err(tmp_path / "empty.onnx")
    (tmp_path / "text.onnx").write_text("this is not a model\n" * 20)
    assert "not" in err(tmp_path / "text.onnx") and "text.onnx" in err(tmp_path / "text.onnx")
    (tmp_path / "rand.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    assert "rand.onnx" in err(tmp_path / "rand.onnx")
    data = open(os.path.join(ROOT, "examples", "conv_digits.onnx"), "rb").read()
    for frac in (0.1, 0.5, 0.9):
        p = tmp_path / f"trunc{frac}.onnx"
        p.write_bytes(data[:int(len(data) * frac)])
        assert f"trunc{frac}.onnx" in err(p)


@pytest.mark.parametrize("op,attrs", [("LRN", {"size": 3}), ("Transpose", {"perm": [1, 0, 2, 3]}),
                                      ("Sigmoid", {}), ("Tanh", {})])
def test_unsupported_op_is_named(op, attrs, tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="first"),
             helper.make_node(op, ["r"], ["y"], name="the_bad_one", **attrs)]
    m = _model(nodes, [_vi("x", ["N", 3, 4, 4])], [_vi("y", None)])
    msg = err(save(m, tmp_path / "bad.onnx"))
    assert op in msg and "the_bad_one" in msg and "bad.onnx" in msg
    assert "supports" in msg and "Conv" in msg and "MaxPool" in msg


@pytest.mark.parametrize("axis", [0, 2, -1])
def test_concat_along_the_batch_or_a_spatial_axis_is_refused(axis, tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["y"], axis=axis, name="cat")]
    m = _model(nodes, [_vi("x", ["N", 3, 4, 4])], [_vi("y", None)])
    msg = err(save(m, tmp_path / "cat.onnx"))
    assert "Concat node 'cat'" in msg
    assert ("batch axis" if axis == 0 else "only along the channels") in msg


def test_loop_is_refused(tmp_path):
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Relu", ["v_in"], ["v_out"])], "body",
        [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL),
         _vi("v_in", ["N", 4])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("v_out", ["N", 4])])
    nodes = [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body, name="loop1")]
    m = _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])],
               [_init("trip", np.array(3, np.int64)), _init("cond", np.array(True))])
    msg = err(save(m, tmp_path / "loop.onnx"))
    assert "Loop" in msg and "loop1" in msg


def test_cycle_is_refused(tmp_path):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="n_a"),
             helper.make_node("Relu", ["a"], ["b"], name="n_b"),
             helper.make_node("Relu", ["b"], ["y"], name="n_out")]
    m = _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])])
    path = tmp_path / "cycle.onnx"
    path.write_bytes(m.SerializeToString())
    msg = err(path)
    assert "cycle" in msg and "n_a" in msg and "n_b" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(bad, tmp_path):
    w = np.ones((2, 1, 3, 3), np.float32)
    w[1, 0, 2, 2] = bad
    msg = err(save(_conv_model(w=w), tmp_path / "nan.onnx"))
    assert "NaN or Inf" in msg and "'w'" in msg


def test_dynamic_non_batch_dim_is_refused(tmp_path):
    msg = err(save(_conv_model(xshape=["N", 1, "H", 4]), tmp_path / "dyn.onnx"))
    assert "'H'" in msg and "axis 2" in msg


def test_batch_dim_may_be_symbolic_or_fixed(tmp_path):
    for i, xshape in enumerate((["N", 1, 4, 4], [1, 1, 4, 4], [7, 1, 4, 4])):
        g = load_onnx(save(_conv_model(xshape=xshape), tmp_path / f"b{i}.onnx"))
        assert g.inputs[0].shape == (1, 4, 4)


@pytest.mark.parametrize("opset", [8, 24])
def test_opset_out_of_range(opset, tmp_path):
    msg = err(save(_conv_model(opset=opset), tmp_path / "ops.onnx"))
    assert f"opset {opset}" in msg and "9..23" in msg


def test_multiple_data_inputs_are_refused(tmp_path):
    nodes = [helper.make_node("Add", ["x", "z"], ["y"])]
    m = _model(nodes, [_vi("x", ["N", 4]), _vi("z", ["N", 4])], [_vi("y", ["N", 4])])
    msg = err(save(m, tmp_path / "two.onnx"))
    assert "exactly one graph input" in msg and "x" in msg and "z" in msg


def test_softmax_not_at_output_is_refused(tmp_path):
    nodes = [helper.make_node("Softmax", ["x"], ["s"], name="sm"),
             helper.make_node("Relu", ["s"], ["y"])]
    m = _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])])
    msg = err(save(m, tmp_path / "sm.onnx"))
    assert "Softmax" in msg and "output" in msg


def test_external_data(tmp_path):
    # inside the folder: loads
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 32)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)]
    m = _model(nodes, [_vi("x", ["N", 32])], [_vi("y", ["N", 64])], [_init("w", w)])
    inside = tmp_path / "inside"
    inside.mkdir()
    onnx.save(m, str(inside / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    g, _ = check_against_ort(str(inside / "m.onnx"))
    assert g.nodes[0].op.kind == "dense"
    # pointing outside the model's folder: refused before anything is read
    for loc in ("../secret.data", str(tmp_path / "secret.data")):
        model = onnx.load(str(inside / "m.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = loc
        (tmp_path / "secret.data").write_bytes(np.zeros(64 * 32, np.float32).tobytes())
        p = inside / "evil.onnx"
        p.write_bytes(model.SerializeToString())
        msg = err(p)
        assert "external data" in msg and "'w'" in msg
    # missing external file
    model = onnx.load(str(inside / "m.onnx"), load_external_data=False)
    os.remove(inside / "m.data")
    p = inside / "missing.onnx"
    p.write_bytes(model.SerializeToString())
    assert "not found" in err(p)


@pytest.mark.parametrize("case", ["conv1d", "conv3d", "bn_training", "int_input",
                                  "mul_full", "reshape_other", "clip_no_min"])
def test_out_of_scope_forms_are_refused(case, tmp_path):
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    x4 = _vi("x", ["N", 2, 4, 4])
    if case == "conv1d":
        m = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [_vi("x", ["N", 2, 8])],
                   [_vi("y", None)], [_init("w", f(3, 2, 3))])
    elif case == "conv3d":
        m = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [_vi("x", ["N", 2, 4, 4, 4])],
                   [_vi("y", None)], [_init("w", f(3, 2, 3, 3, 3))])
    elif case == "bn_training":
        m = _model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"],
                                     ["y", "rm", "rv"], training_mode=1)], [x4],
                   [_vi("y", None), _vi("rm", None), _vi("rv", None)],
                   [_init(k, np.abs(f(2))) for k in "sbmv"])
    elif case == "int_input":
        m = _model([helper.make_node("Relu", ["x"], ["y"])],
                   [_vi("x", ["N", 4], TensorProto.INT32)], [_vi("y", None, TensorProto.INT32)])
    elif case == "mul_full":
        m = _model([helper.make_node("Mul", ["x", "k"], ["y"])], [x4], [_vi("y", None)],
                   [_init("k", f(2, 4, 4))])
    elif case == "reshape_other":
        m = _model([helper.make_node("Reshape", ["x", "s"], ["y"])], [x4], [_vi("y", None)],
                   [_init("s", np.array([0, 4, 8], np.int64))])
    else:
        m = _model([helper.make_node("Clip", ["x", "", "hi"], ["y"])], [x4], [_vi("y", None)],
                   [_init("hi", np.array(1.0, np.float32))])
    msg = err(save(m, tmp_path / f"{case}.onnx"))
    assert f"{case}.onnx" in msg


def test_corrupted_files_never_crash(tmp_path):
    """Random byte flips in a real model: it loads or raises EpcError, nothing else."""
    rng = np.random.default_rng(0)
    data = open(os.path.join(ROOT, "examples", "resnet13.onnx"), "rb").read()
    outcomes = {"ok": 0, "refused": 0}
    for k in range(40):
        d = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            # mostly the graph structure (after the weights), sometimes anywhere
            lo = 0 if rng.random() < 0.3 else max(0, len(d) - 3000)
            d[int(rng.integers(lo, len(d)))] = int(rng.integers(0, 256))
        p = tmp_path / f"fuzz{k}.onnx"
        p.write_bytes(bytes(d))
        try:
            load_onnx(str(p))
            outcomes["ok"] += 1
        except EpcError as e:
            assert f"fuzz{k}.onnx" in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


def _bad_structure(case: str):
    """Issue 23's bad input: linear structure epc cannot take, one node named 'bad'."""
    x = _vi("x", ["N", 4, 4, 4])
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    relus = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"])]
    if case == "concat_batch":
        return _model(relus + [helper.make_node("Concat", ["a", "b"], ["y"], axis=0,
                                                name="bad")], [x], [_vi("y", None)])
    if case == "concat_spatial":
        return _model(relus + [helper.make_node("Concat", ["a", "b"], ["y"], axis=3,
                                                name="bad")], [x], [_vi("y", None)])
    if case == "slice_steps":
        return _model([helper.make_node("Slice", ["x", "s", "e", "ax", "st"], ["y"], name="bad")],
                      [x], [_vi("y", None)],
                      [_init("s", i64(0)), _init("e", i64(4)), _init("ax", i64(2)),
                       _init("st", i64(2))])
    if case == "reshape_mixing_samples":
        return _model([helper.make_node("Reshape", ["x", "s"], ["r"], name="bad"),
                       helper.make_node("Relu", ["r"], ["y"])], [x], [_vi("y", None)],
                      [_init("s", i64(-1, 32))])
    if case == "reshape_left_5d":
        return _model([helper.make_node("Reshape", ["x", "s"], ["y"], name="bad")], [x],
                      [_vi("y", None)], [_init("s", i64(0, 2, 2, 4, 4))])
    assert case == "transpose_batch"
    return _model([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2, 3], name="bad")],
                  [x], [_vi("y", None)])


BAD_STRUCTURE = {"concat_batch": "batch axis", "concat_spatial": "only along the channels",
                 "slice_steps": "step 2", "reshape_mixing_samples": "mixes samples",
                 "reshape_left_5d": "permutations of the elements",
                 "transpose_batch": "moves the batch axis"}


@pytest.mark.parametrize("case", sorted(BAD_STRUCTURE))
def test_structure_epc_cannot_express_is_refused_by_the_cli(case, run_cli, tmp_path):
    """`epc compile` refuses each on one line naming the node and the reason, exit 2,
    nothing written; a Reshape that keeps samples apart is a per-sample permutation and
    compiles (checked against onnxruntime)."""
    src, out = save(_bad_structure(case), tmp_path / f"{case}.onnx"), tmp_path / "out.epc"
    code, _, err = run_cli("compile", src, "-o", out)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epc: error: ") and "Traceback" not in err
    assert "node 'bad'" in lines[0] and BAD_STRUCTURE[case] in lines[0]
    assert f"{case}.onnx" in lines[0] and not out.exists()


def test_a_reshape_that_keeps_samples_apart_is_a_permutation(tmp_path):
    """[N, 4, 4, 4] -> [N, 8, 2, 4] then a Transpose of the per-sample axes: the elements
    of each sample are permuted, which epc takes (and onnxruntime agrees)."""
    m = _model([helper.make_node("Reshape", ["x", "s"], ["r"]),
                helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
                helper.make_node("Relu", ["t"], ["y"])], [_vi("x", ["N", 4, 4, 4])],
               [_vi("y", None)], [_init("s", np.array([0, 8, 2, 4], np.int64))])
    g, _ = check_against_ort(save(m, tmp_path / "regroup.onnx"))
    assert [n.op.kind for n in g.nodes] == ["permute", "act"]


class _TwoShuffles(nn.Module):
    """ShuffleNetV2's pattern: a channel shuffle written with x.size() and view, twice.
    Exported with a dynamic batch, the second shuffle reads the shape of the first one's
    output, which ONNX shape inference cannot size (a Reshape to a computed shape): the
    frontend folds that Shape from the value it translated."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    @staticmethod
    def shuffle(x):
        n, c, h, w = x.size()
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)

    def forward(self, x):
        y = self.shuffle(torch.relu(self.conv(x)))
        a, b = y.chunk(2, dim=1)
        y = self.shuffle(torch.cat([a, torch.relu(b)], 1))
        return self.fc(torch.flatten(y, 1))


def test_shape_plumbing_after_a_computed_reshape_is_folded(tmp_path):
    torch.manual_seed(0)
    path = be.export_legacy(_TwoShuffles(), (2, 4, 4), str(tmp_path / "shuffles.onnx"))
    g, _ = check_against_ort(path)
    kinds = [n.op.kind for n in g.nodes]
    assert kinds.count("permute") == 2 and kinds.count("concat") == 1


def test_a_product_of_a_per_sample_scalar_is_refused_by_name(tmp_path):
    """A Mul by a constant of a value with no per-sample axes (a ViT's scalar plumbing
    was an IndexError in the builder): one refusal naming the node."""
    m = _model([helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
                helper.make_node("Squeeze", ["h", "ax"], ["s"]),
                helper.make_node("Mul", ["s", "two"], ["y"], name="scalar_mul")],
               [_vi("x", ["N", 4])], [_vi("y", ["N"])],
               [_init("w", np.ones((1, 4), np.float32)), _init("ax", np.array([1], np.int64)),
                _init("two", np.array(2.0, np.float32))])
    msg = err(save(m, tmp_path / "scalar.onnx"))
    assert "Mul x1 (first: node 'scalar_mul': product of a per-sample scalar" in msg
