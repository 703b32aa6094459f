"""Strict readers: each input issue 25 found crashing epc, or silently accepted, is refused
with one `epc: error:` line naming the file (IR text, bundles, programs, ONNX, data), with
no numpy warning printed before it."""
from __future__ import annotations

import io
import json
import pickle
import warnings
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from epc.compiler.bundle import bundle_bytes, Bundle, read_bundle
from epc.compiler.errors import EpcError
from epc.compiler.text import print_graph
from epc.runtime import zoo

MLP_TEXT = print_graph(zoo.mlp((6, 5, 3), name="small"), weights="inline")


def _refused(run_cli, path, *needles, cmd=("inspect",)):
    """The command's one error line, which must name `path` and each needle; no warning
    may be raised on the way (it would print before the line)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        code, out, err = run_cli(*cmd, path)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("epc: error: "), (code, err)
    for n in (str(path), *needles):
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- IR text
@pytest.mark.parametrize("old,new,why", [
    ("bias=@", "bias_=@", "unknown attribute 'bias_'"),            # one flipped bit
    ("role=hidden, bias=@h1.b", "role=hidden, bias=@h1.b, bias=@h1.b", "given twice"),
    ("clip(lo=0.0, hi=1.0)", 'clip(lo="a", hi=1.0)', "must be a finite number"),
    ("clip(lo=0.0, hi=1.0)", "clip(lo=0.0)", "needs lo=, hi="),
    ("clip(lo=0.0, hi=1.0)", "clip(lo=1.0, hi=0.0)", "lo < hi"),
    ("temperature=1.0", "temperature=0.0", "'temperature' must be a finite number > 0"),
    ("max_sweeps=100", "max_sweeps=" + "9" * 5000, "integer out of range"),
    ("input x : [6]", "input x : [" + "1, " * 40 + "6]", "at most 32 dimensions"),
    ("input x : [6]", "input x : [0]", "a dimension is an integer >= 1"),
    ('graph small {', 'graph small {\n  attr bad = "\\q"', "bad string"),
    ('graph small {', 'graph small {\n  attr bad = "\\ud800"', "bad string"),
    ("dense [weight=@", "dense [weight=3, x=@", "attribute 'weight' must be a weight reference"),
    ("weight h1.b : f32[5]", "weight h1.b : q8[5]", "unknown dtype 'q8'"),
])
def test_bad_ir_text(run_cli, tmp_path, old, new, why):
    assert old in MLP_TEXT
    p = tmp_path / "g.epir"
    p.write_text(MLP_TEXT.replace(old, new, 1))
    _refused(run_cli, p, why)


def test_deep_nesting_and_seeded_sizes(run_cli, tmp_path, monkeypatch):
    p = tmp_path / "g.epir"
    p.write_text(MLP_TEXT.replace("dense [weight=@", "dense [stride=" + "[" * 5000 + "]" * 5000
                                  + ", weight=@", 1))
    _refused(run_cli, p, "nested deeper than 16")
    # a seeded weight is a few bytes of text for any size: what it makes is counted
    p.write_text(MLP_TEXT.replace("graph small {", "graph small {\n  weight big : "
                                  "f32[65536, 65536] = seeded(1)", 1))
    _refused(run_cli, p, "seeded(...) weights would take about", "--memory-limit")
    monkeypatch.setenv("EPC_MEMORY_LIMIT", "lots")
    code, _, err = run_cli("inspect", p)
    assert code == 2 and err.startswith("epc: error: bad EPC_MEMORY_LIMIT 'lots': use a size")


# --------------------------------------------------------------------------- bundles
def _members(raw: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def _zip(items, compression=zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(out, "w", compression) as z:
            for n, b in items:
                z.writestr(n, b)
    return out.getvalue()


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


RAW = bundle_bytes(Bundle(zoo.mlp((6, 5, 3), name="small"), target="torch"))


def _replace(name, body):
    return _zip([(n, body if n == name else b) for n, b in _members(RAW)])


def _w(raw=RAW):
    return next(n for n, _ in _members(raw) if n.startswith("weights/"))


def _manifest(**changes):
    m = json.loads(dict(_members(RAW))["manifest.json"])
    m.update(changes)
    return _replace("manifest.json", json.dumps(m).encode())


def _encrypted(raw: bytes) -> bytes:
    b = bytearray(raw)
    i = bytes(b).index(b"PK\x01\x02")
    b[i + 8] |= 1
    return bytes(b)


def _header(descr, shape=None) -> bytes:
    arr = np.load(io.BytesIO(dict(_members(RAW))[_w()]))
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False,
                                               "shape": arr.shape if shape is None else shape})
    return out.getvalue() + arr.tobytes()


BAD_BUNDLES = {
    "duplicate": (lambda: _zip(_members(RAW) + [_members(RAW)[-1]]), "appears twice"),
    "encrypted": (lambda: _encrypted(RAW), "is encrypted"),
    "bzip2": (lambda: _zip(_members(RAW), zipfile.ZIP_BZIP2), "compression method 12"),
    "big endian": (lambda: _replace(_w(), _header(">f4")), "little-endian"),
    "timedelta": (lambda: _replace(_w(), _header("<m8[s]")), "little-endian real numbers"),
    "complex": (lambda: _replace(_w(), _npy(np.zeros(5, np.complex64))), "holds <c8 data"),
    "integer": (lambda: _replace(_w(), _npy(np.zeros(5, np.int32))), "the IR declares float32"),
    "bool": (lambda: _replace(_w(), _npy(np.zeros(5, bool))), "little-endian real numbers"),
    "32 GiB header": (lambda: _replace(_w(), _header("<f4", (1 << 33,))),
                      "the IR declares"),
    "meta list": (lambda: _manifest(meta=[1, 2]), "meta is not a JSON object"),
    "version true": (lambda: _manifest(version=True), "version True"),
    "unknown member": (lambda: _zip(_members(RAW) + [("weights/x.npy.bak", b"")]),
                       "unexpected member"),
    "deep json": (lambda: _zip(_members(RAW) + [("extra/h.json", b"[" * 100000)]),
                  "not valid JSON"),
    "nan weight": (lambda: _replace(_w(), _npy(np.full(np.load(io.BytesIO(
        dict(_members(RAW))[_w()])).shape, np.nan, np.float32))), "NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_bad_bundles(run_cli, tmp_path, case):
    make, why = BAD_BUNDLES[case]
    p = tmp_path / "b.epc"
    p.write_bytes(make())
    _refused(run_cli, p, why)


def test_compressed_members_are_counted_before_reading(tmp_path, monkeypatch):
    g = zoo.mlp((64, 512, 10), name="wide")
    p = tmp_path / "deflated.epc"
    p.write_bytes(_zip(_members(bundle_bytes(Bundle(g))), zipfile.ZIP_DEFLATED))
    monkeypatch.setenv("EPC_MEMORY_LIMIT", "64K")
    with pytest.raises(EpcError, match="decompressing its members would take about"):
        read_bundle(p)
    monkeypatch.setenv("EPC_MEMORY_LIMIT", "4M")
    assert read_bundle(p).graph.weights.keys() == g.weights.keys()   # stored or deflated


# --------------------------------------------------------------------------- programs
@pytest.fixture(scope="module")
def program_text(tmp_path_factory):
    from epc import api
    d = tmp_path_factory.mktemp("prog")
    from epc.targets.torch import emit
    emit(zoo.mlp((64, 12, 10)), d / "m.epc", None)
    api.compile_result(str(d / "m.epc"), target="neuromorphic", output=str(d / "m.nca"))
    return (d / "m.nca").read_text()


@pytest.mark.parametrize("pattern,new,why", [
    (r"(?<=state u8 )\[12\]", "[4294967296,4294967296]", "more than a core memory holds"),
    (r"\[12,64\]", "[" + "9" * 30 + ",1]", "out of range"),
    (r"\[12\]", "[" + ",".join(["1"] * 20) + ",12]", "1 to 8 positive dimensions"),
    (r"(?m)^  (-?\d+) ", "  99999999999999999999 ", "out of range"),
])
def test_bad_programs(run_cli, tmp_path, program_text, pattern, new, why):
    import re
    assert re.search(pattern, program_text), pattern
    p = tmp_path / "p.nca"
    p.write_text(re.sub(pattern, new, program_text, count=1))
    _refused(run_cli, p, why)


# --------------------------------------------------------------------------- ONNX
def _gemm_conv_model(**edit):
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.normal(0, .3, (2, 1, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(np.ones(2, np.float32), "s"),
             numpy_helper.from_array(np.zeros(2, np.float32), "b"),
             numpy_helper.from_array(np.zeros(2, np.float32), "m"),
             numpy_helper.from_array(edit.get("var", np.ones(2, np.float32)), "v"),
             numpy_helper.from_array(edit.get("div", np.full((1, 2, 1, 1), 2, np.float32)), "d"),
             numpy_helper.from_array(r.normal(0, .3, (3, 32)).astype(np.float32), "fw")]
    conv_attrs = {"pads": [1, 1, 1, 1], **edit.get("conv", {})}
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", **conv_attrs),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"],
                              name=edit.get("bn_name", "bn")),
             helper.make_node("Div", ["n", "d"], ["q"], name="div"),
             helper.make_node("Relu", ["q"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fw"], ["y"], name="gemm", transB=1,
                              alpha=edit.get("alpha", 1.0))]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("edit,why", [
    ({"alpha": float("nan")}, "alpha nan and beta 1.0 must be finite numbers"),
    ({"alpha": float("inf")}, "must be finite numbers"),
    ({"var": np.array([1.0, -1.0], np.float32)}, "variance + epsilon must be positive"),
    ({"div": np.array([2, 1e-45], np.float32).reshape(1, 2, 1, 1)}, "not finite in float32"),
    ({"conv": {"auto_pad": "SAME_UPPER"}}, "both auto_pad 'SAME_UPPER' and explicit pads"),
    ({"bn_name": "conv"}, "two nodes are named 'conv'"),
])
def test_bad_onnx(run_cli, tmp_path, edit, why):
    p = tmp_path / "m.onnx"
    onnx.save(_gemm_conv_model(**edit), str(p))
    _refused(run_cli, p, why, cmd=("compile", "-o", str(tmp_path / "o.epc")))
    assert not (tmp_path / "o.epc").exists()


def test_the_model_itself_is_fine(run_cli, tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(_gemm_conv_model(), str(p))
    code, out, err = run_cli("compile", p, "-o", tmp_path / "o.epc", "--verify")
    assert code == 0 and "verify: max relative error" in err, err


def test_verify_when_onnxruntime_refuses_the_model(run_cli, tmp_path, examples):
    """epc's frontend reads this model (it imports an ai.onnx.ml opset onnxruntime does not
    support, in a domain epc does not use); --verify's reference cannot run it: one line
    with onnxruntime's reason, not its log."""
    m = onnx.load(str(examples / "mlp_digits.onnx"))
    m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 99))
    p = tmp_path / "ml99.onnx"
    onnx.save(m, str(p))
    assert run_cli("compile", p, "-o", tmp_path / "a.epc")[0] == 0
    line = _refused(run_cli, p, "--verify: onnxruntime cannot load the model: ",
                    "Opset 99 is under development",
                    cmd=("compile", "--verify", "-o", str(tmp_path / "b.epc")))
    assert "onnxruntime_src" not in line and "[ONNXRuntimeError]" not in line


# --------------------------------------------------------------------------- data
def test_cifar_python_labels(tmp_path):
    from epc.runtime.data import load_dataset
    rng = np.random.default_rng(0)

    def batch(labels, n=3):
        return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                             b"labels": labels}, protocol=3)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for bad, why in ((["a", "b", "c"], "not a list of integer labels"),
                     ([1, 2], "2 labels for 3 images"), ([1, 2, 3, 4], "4 labels for 3 images")):
        for i in range(1, 6):
            (d / f"data_batch_{i}").write_bytes(batch([1, 2, 3]))
        (d / "test_batch").write_bytes(batch([1, 2, 3]))
        (d / "data_batch_3").write_bytes(batch(bad))
        with pytest.raises(EpcError, match=why):
            load_dataset("cifar10", data_dir=tmp_path)
