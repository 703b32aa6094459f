"""The onnx package's own operator conformance cases, run through load_onnx + run_feedforward.

The node test data is not shipped in the onnx wheel (and `python -m onnx.backend.test.
cmd_tools generate-data` only writes the model-level cases), so a session fixture imports
the node-case modules of the supported op families and writes each case in the standard
layout (model.onnx, test_data_set_0/input_j.pb, output_j.pb) into a tmp dir. Each case's
non-first inputs become initializers (a model has one data input; weights are constants);
the result of the reference interpreter is compared with the expected output_0.pb.

Cases outside epc's scope (1-D/3-D pooling, integer tensors, training-mode dropout,
broadcasting forms, ...) must be refused with EpcError; no other exception may escape.
"""
from __future__ import annotations

import importlib
import os
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from epc.compiler.errors import EpcError
from epc.compiler.reference import run_feedforward
from epc.compiler.verify import problems
from epc.frontends.onnx import MAX_OPSET, load_onnx

# onnx.backend.test.case.node modules of the supported op families
FAMILIES = ("conv gemm matmul relu clip hardsigmoid batch_normalization add sum maxpool "
            "averagepool globalaveragepool reducemean flatten reshape identity dropout "
            "softmax logsoftmax mul sub div").split()

# In-scope cases that must import and reproduce the expected output. The families' other
# cases are refused by design: 1-D inputs (no batch axis plus a sample), integer tensors,
# 1-D/3-D pooling, constants that vary along the batch axis or broadcast along a non-channel
# axis, softmax over a non-class axis, training-mode dropout/batchnorm, used mask/indices
# outputs, reshapes other than [N, -1], average pooling with asymmetric (SAME) padding,
# pads larger than half the kernel, Clip without a lower bound, and the function-expanded
# variants (whose bodies use ops outside the supported set).
MUST_PASS = """
test_basic_conv_with_padding test_basic_conv_without_padding test_conv_with_strides_padding
test_conv_with_strides_no_padding test_conv_with_strides_and_asymmetric_padding
test_conv_with_autopad_same
test_gemm_default_zero_bias test_gemm_default_no_bias test_gemm_default_scalar_bias
test_gemm_default_single_elem_vector_bias test_gemm_default_vector_bias test_gemm_transposeB
test_gemm_alpha test_gemm_beta
test_matmul_2d
test_relu test_clip test_clip_default_min test_hardsigmoid test_hardsigmoid_default
test_batchnorm_example test_batchnorm_epsilon
test_add_bcast test_sub_bcast
test_maxpool_2d_precomputed_pads test_maxpool_2d_precomputed_strides
test_maxpool_2d_precomputed_same_upper test_maxpool_2d_default test_maxpool_2d_same_upper
test_maxpool_2d_same_lower test_maxpool_2d_strides test_maxpool_2d_ceil
test_maxpool_2d_ceil_output_size_reduce_by_one test_maxpool_2d_dilations
test_averagepool_2d_precomputed_pads test_averagepool_2d_precomputed_pads_count_include_pad
test_averagepool_2d_precomputed_strides test_averagepool_2d_precomputed_same_upper
test_averagepool_2d_default test_averagepool_2d_strides test_averagepool_2d_ceil
test_averagepool_2d_ceil_last_window_starts_on_pad
test_globalaveragepool test_globalaveragepool_precomputed
test_flatten_axis1 test_flatten_default_axis test_flatten_negative_axis3
test_reshape_reduced_dims test_identity
test_dropout_default test_dropout_default_ratio test_dropout_random_old
test_softmax_example test_softmax_large_number test_logsoftmax_example_1
test_logsoftmax_large_number
""".split()

RTOL = 1e-4
# Expected outputs printed to 4 decimals in the onnx test source: their own precision.
ROUNDED_REFERENCE = {"test_averagepool_2d_ceil_last_window_starts_on_pad": 1e-3}
RESTAMPABLE = {"Flatten", "Reshape", "Identity"}


def _write_case(case, root: str) -> None:
    out = os.path.join(root, case.name)
    os.makedirs(os.path.join(out, "test_data_set_0"), exist_ok=True)
    with open(os.path.join(out, "model.onnx"), "wb") as f:
        f.write(case.model.SerializeToString())
    inputs, outputs = case.data_sets[0]
    for kind, values, vis in (("input", inputs, case.model.graph.input),
                              ("output", outputs, case.model.graph.output)):
        for j, v in enumerate(values):
            if not vis[j].type.HasField("tensor_type"):
                continue   # sequences / optionals: no tensor file (the case is refused)
            t = v if isinstance(v, onnx.TensorProto) else numpy_helper.from_array(
                np.asarray(v), vis[j].name)
            with open(os.path.join(out, "test_data_set_0", f"{kind}_{j}.pb"), "wb") as f:
                f.write(t.SerializeToString())


@pytest.fixture(scope="session")
def node_cases(tmp_path_factory) -> dict[str, str]:
    """Generate the node cases of the supported families once; name -> case folder."""
    root = str(tmp_path_factory.mktemp("onnx_node_cases"))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        node = importlib.import_module("onnx.backend.test.case.node")
        for fam in FAMILIES:
            importlib.import_module(f"onnx.backend.test.case.node.{fam}")
        cases = list(node._NodeTestCases)
    assert len(cases) > 150   # the generator produced the families' cases
    for case in cases:
        _write_case(case, root)
    return {c.name: os.path.join(root, c.name) for c in cases}


def _read_pb(path: str) -> np.ndarray:
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


def _restamp_opset(model) -> None:
    """Cases generated at an opset above epc's range whose operator is defined the same way
    at MAX_OPSET for float tensors (Flatten, Reshape, Identity gained new types only) are
    re-stamped to MAX_OPSET; anything else keeps its opset (and is refused by opset)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > MAX_OPSET:
            ops = {n.op_type for n in model.graph.node}
            if ops <= RESTAMPABLE:
                imp.version = MAX_OPSET


def run_case(case_dir: str, work_dir: str):
    """('pass', err) | ('refused', message) | ('mismatch', err); other exceptions propagate."""
    model = onnx.load(os.path.join(case_dir, "model.onnx"))
    data = os.path.join(case_dir, "test_data_set_0")
    g = model.graph
    n_in = len(g.input)
    ins = [os.path.join(data, f"input_{j}.pb") for j in range(n_in)]
    for j in range(n_in - 1, 0, -1):   # non-first inputs become initializers
        if not os.path.exists(ins[j]):
            return "refused", "non-tensor input"
        t = onnx.TensorProto()
        with open(ins[j], "rb") as f:
            t.ParseFromString(f.read())
        t.name = g.input[j].name
        g.initializer.append(t)
        del g.input[j]
    _restamp_opset(model)
    path = os.path.join(work_dir, os.path.basename(case_dir) + ".onnx")
    onnx.save(model, path)
    try:
        ir = load_onnx(path)
    except EpcError as e:
        return "refused", str(e)
    assert not problems(ir), problems(ir)
    x = np.array(_read_pb(ins[0]))
    got = run_feedforward(ir, {ir.inputs[0].name: x})[ir.outputs[0]]
    want = _read_pb(os.path.join(data, "output_0.pb")).astype(np.float64)
    if got.shape != want.shape:
        return "mismatch", f"shape {got.shape} vs {want.shape}"
    err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))
    tol = ROUNDED_REFERENCE.get(os.path.basename(case_dir), RTOL)
    return ("pass" if err < tol else "mismatch"), err


@pytest.mark.parametrize("name", MUST_PASS)
def test_in_scope_case_passes(name, node_cases, tmp_path):
    assert name in node_cases, f"onnx no longer ships case {name}"
    status, detail = run_case(node_cases[name], str(tmp_path))
    assert status == "pass", (name, status, detail)


def test_every_case_passes_or_is_refused_cleanly(node_cases, tmp_path):
    results = {name: run_case(d, str(tmp_path)) for name, d in sorted(node_cases.items())}
    mismatches = {n: r for n, r in results.items() if r[0] == "mismatch"}
    assert not mismatches, mismatches
    passed = sorted(n for n, r in results.items() if r[0] == "pass")
    refused = {n: r[1] for n, r in results.items() if r[0] == "refused"}
    # every refusal names the file and the reason (a one-line user-facing message)
    for n, msg in refused.items():
        assert msg and "\n" not in msg, (n, msg)
    assert set(MUST_PASS) <= set(passed)
    print(f"\nonnx node conformance: {len(passed)} passed, {len(refused)} refused cleanly, "
          f"{len(results)} cases")
