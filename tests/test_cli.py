"""The spine's command line: compile / inspect end to end, and every bad input of the
compiler issue ending in one `epc: error:` line, exit status 2, no partial output."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from epc.compiler.bundle import read_bundle
from epc.compiler.text import parse, print_graph

EXAMPLE_NAMES = ["mlp_digits", "mlp3_digits", "conv_digits", "conv1_digits", "vgg_cifar",
                 "resnet13", "hopfield_resnet13", "mobilenet_cifar"]


def _one_error_line(code, out, err, *needles):
    assert code == 2, (code, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("epc: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_compile_verify_every_example(run_cli, examples, tmp_path, name):
    out = tmp_path / f"{name}.epc"
    code, _, err = run_cli("compile", examples / f"{name}.onnx", "-o", out, "--verify")
    assert code == 0, err
    assert "verify: max relative error" in err
    g = read_bundle(out).graph
    assert g.is_energy and g.schedule is not None
    # the bundle's IR text round-trips byte for byte through the parser
    text = print_graph(g)
    assert print_graph(parse(text)) == text


def test_inspect_formats(run_cli, examples, tmp_path):
    b = tmp_path / "r13.epc"
    assert run_cli("compile", examples / "resnet13.onnx", "-o", b)[0] == 0
    code, text, _ = run_cli("inspect", b)
    assert code == 0 and text.startswith("epc-ir 1\n")
    # a text IR file: printing what was parsed reproduces the file byte for byte
    ir = tmp_path / "r13.ir"
    ir.write_text(text)
    code, again, _ = run_cli("inspect", ir)
    assert code == 0 and again == text

    code, js, _ = run_cli("inspect", b, "--format", "json", "--stats")
    d = json.loads(js)
    assert code == 0
    names = {s["name"] for s in d["states"]}
    assert {"name", "shape", "activation"} <= set(d["states"][0])
    for c in d["couplings"]:
        assert {"name", "src", "dst", "ops", "kind", "feedback"} <= set(c)
        assert c["dst"] in names
    kinds = {c["kind"] for c in d["couplings"]}
    assert "residual" in kinds and "forward" in kinds          # ResNet skips are explicit
    order = [n for cls in d["schedule"]["classes"] for n in cls]
    assert sorted(order) == sorted(s["name"] for s in d["states"] if s["role"] != "teacher")
    assert d["stats"]["parameters"] > 0 and d["stats"]["macs_per_sweep"] > 0

    code, dot, _ = run_cli("inspect", b, "--format", "dot")
    assert code == 0 and dot.startswith("digraph") and "dir=both" in dot and "dashed" in dot
    code, st, _ = run_cli("inspect", b, "--stats")
    assert code == 0 and "MACs per sweep" in st and "colour classes" in st


def test_taps_teacher_print_after_all(run_cli, examples, tmp_path):
    out = tmp_path / "c.epc"
    code, stdout, err = run_cli("compile", examples / "vgg_cifar.onnx", "--taps", "auto",
                                "--teacher", "source", "--print-after-all", "-o", out)
    assert code == 0, err
    # the passes that ran, in order (pool_first and readout are off and are not printed)
    assert re.findall(r"^// ----- IR after (\w+)", stdout, re.M) == [
        "canonicalize", "to_energy", "symmetrize", "residual", "taps", "teacher", "schedule"]
    g = read_bundle(out).graph
    assert any(c.kind == "tap" for c in g.couplings)
    assert any(c.kind == "teacher" for c in g.couplings) and g.teacher is not None
    assert {c.kind for c in g.costs} >= {"kl"}
    code, stdout, _ = run_cli("compile", examples / "mlp_digits.onnx", "-o", tmp_path / "m.epc",
                              "--print-after", "schedule")
    assert code == 0 and stdout.count("// ----- IR after") == 1


def test_compile_accepts_a_bundle(run_cli, examples, tmp_path):
    a, b = tmp_path / "a.epc", tmp_path / "b.epc"
    assert run_cli("compile", examples / "mlp_digits.onnx", "-o", a)[0] == 0
    code, _, err = run_cli("compile", a, "-o", b)
    assert code == 0, err
    assert print_graph(read_bundle(a).graph) == print_graph(read_bundle(b).graph)
    _one_error_line(*run_cli("compile", a, "--taps", "auto", "-o", tmp_path / "c.epc"),
                    "already compiled")
    _one_error_line(*run_cli("compile", a, "--skip-gain", "0.5", "-o", tmp_path / "c.epc"),
                    "already compiled; --skip-gain")


def test_torch_target_notes_gain_one_identity_skips(run_cli, examples, tmp_path):
    r13 = examples / "resnet13.onnx"
    code, _, err = run_cli("compile", r13, "--target", "torch", "-o", tmp_path / "a.epc")
    assert code == 0, err
    note = "note: 3 identity skip(s) of gain 1 join states (h2->h4, h6->h8, h10->h12)"
    assert note in err
    # learned identities start at gain 1 too; scaled skips or no identity skips: no note
    code, _, err = run_cli("compile", r13, "--target", "torch", "--identity-skip", "learned",
                           "-o", tmp_path / "b.epc")
    assert code == 0 and note in err, err
    code, _, err = run_cli("compile", r13, "--target", "torch", "--skip-gain", "0.5",
                           "-o", tmp_path / "b.epc")
    assert code == 0 and "note:" not in err, err
    code, _, err = run_cli("compile", examples / "hopfield_resnet13.onnx", "--target", "torch",
                           "-o", tmp_path / "c.epc")
    assert code == 0 and "note:" not in err, err


def test_skip_gain_refuses_verify_and_bad_values(run_cli, examples, tmp_path):
    r13 = examples / "resnet13.onnx"
    _one_error_line(*run_cli("compile", r13, "--skip-gain", "0.5", "--verify",
                             "-o", tmp_path / "a.epc"), "--skip-gain 0.5 changes")
    _one_error_line(*run_cli("compile", r13, "--skip-gain", "0", "-o", tmp_path / "a.epc"),
                    "bad --skip-gain")
    assert not (tmp_path / "a.epc").exists()
    code, _, err = run_cli("compile", r13, "--skip-gain", "0.5", "-o", tmp_path / "b.epc")
    assert code == 0, err


# --------------------------------------------------------------------------- bad input
def _save(model, path):
    path.write_bytes(model.SerializeToString())
    return path


def _gemm_model(w: np.ndarray, *, batch="N", feat=4, extra_nodes=(), out_name="y"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, feat])
    y = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, w.shape[0]])
    nodes = [helper.make_node("Gemm", ["x", "W"], ["g"], transB=1, name="fc"),
             helper.make_node("Relu", ["g"], ["y" if not extra_nodes else "r"], name="relu")]
    nodes += list(extra_nodes)
    g = helper.make_graph(nodes, "m", [x], [y], [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


BAD = {}


def bad(fn):
    BAD[fn.__name__] = fn
    return fn


@bad
def missing_file(tmp):
    return tmp / "nope.onnx", ["nope.onnx"]


@bad
def not_onnx(tmp):
    p = tmp / "notes.onnx"
    p.write_text("this is not a model\n" * 20)
    return p, ["notes.onnx"]


@bad
def truncated_onnx(tmp):
    full = _gemm_model(np.ones((3, 4), np.float32)).SerializeToString()
    p = tmp / "trunc.onnx"
    p.write_bytes(full[: len(full) // 2])
    return p, ["trunc.onnx"]


@bad
def unsupported_op(tmp):
    m = _gemm_model(np.ones((3, 4), np.float32),
                    extra_nodes=[helper.make_node("Transpose", ["r"], ["y"], name="tp")])
    return _save(m, tmp / "tp.onnx"), ["Transpose", "tp"]


@bad
def loop_op(tmp):
    # a valid Loop (counts to 3, carrying the activation through unchanged)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["v_in"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 3])])
    loop = helper.make_node("Loop", ["trip", "cond", "r"], ["y"], body=body, name="the_loop")
    m = _gemm_model(np.ones((3, 4), np.float32), extra_nodes=[loop])
    m.graph.initializer.extend([numpy_helper.from_array(np.array(3, np.int64), "trip"),
                                numpy_helper.from_array(np.array(True), "cond")])
    onnx.checker.check_model(m)
    return _save(m, tmp / "loop.onnx"), ["Loop", "the_loop"]


@bad
def cycle(tmp):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="n1"),
             helper.make_node("Relu", ["a"], ["b"], name="n2"),
             helper.make_node("Relu", ["b"], ["y"], name="n3")]
    g = helper.make_graph(nodes, "cyc", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return _save(m, tmp / "cycle.onnx"), ["cycle.onnx"]


@bad
def nan_weights(tmp):
    w = np.ones((3, 4), np.float32)
    w[1, 2] = np.nan
    return _save(_gemm_model(w), tmp / "nan.onnx"), ["nan"]


@bad
def dynamic_dim(tmp):
    return _save(_gemm_model(np.ones((3, 4), np.float32), feat="F"), tmp / "dyn.onnx"), \
        ["dyn.onnx"]


@bad
def ir_syntax_error(tmp):
    p = tmp / "broken.ir"
    p.write_text("epc-ir 1\ngraph g {\n  input x : [4\n}\n")
    return p, ["broken.ir:3:"]


@bad
def newer_bundle(tmp):
    # a valid bundle whose manifest claims a future format version
    from epc.compiler.bundle import Bundle, bundle_bytes
    from epc.compiler.ir import Graph, Input
    raw = bundle_bytes(Bundle(Graph("g", inputs=[Input("x", (4,))])))
    zin = zipfile.ZipFile(io.BytesIO(raw))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "manifest.json":
                d = json.loads(data)
                d["version"] = 99
                data = json.dumps(d).encode()
            zout.writestr(item, data)
    p = tmp / "future.epc"
    p.write_bytes(buf.getvalue())
    return p, ["version 99", "newer"]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_error_line(run_cli, tmp_path, case):
    src, needles = BAD[case](tmp_path)
    out = tmp_path / "out.epc"
    code, stdout, err = run_cli("compile", src, "-o", out)
    _one_error_line(code, stdout, err, *needles)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_inspect_bad_inputs(run_cli, tmp_path):
    _one_error_line(*run_cli("inspect", tmp_path / "none.epc"), "no such file")
    src, needles = ir_syntax_error(tmp_path)
    _one_error_line(*run_cli("inspect", src), *needles)
    src, needles = newer_bundle(tmp_path)
    _one_error_line(*run_cli("inspect", src), *needles)


def test_console_script_has_no_traceback(tmp_path):
    """The installed `epc` entry point itself (not just main()): one line, exit 2."""
    p = subprocess.run([sys.executable, "-m", "epc", "compile",
                        str(tmp_path / "missing.onnx")], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"epc: error: {tmp_path / 'missing.onnx'}: no such file"]


def test_schedule_flags_override_a_compiled_bundle(run_cli, examples, tmp_path):
    """Recompiling a (trained) bundle keeps it, but explicit schedule flags apply."""
    a, b = tmp_path / "a.epc", tmp_path / "b.epc"
    assert run_cli("compile", examples / "conv_digits.onnx", "-o", a)[0] == 0
    code, _, err = run_cli("compile", a, "-o", b, "--max-sweeps", "200", "--tol", "1e-05",
                           "--schedule", "sync")
    assert code == 0, err
    ga, gb = read_bundle(a).graph, read_bundle(b).graph
    assert (gb.schedule.max_sweeps, gb.schedule.tol, gb.schedule.mode) == (200, 1e-5, "sync")
    assert gb.schedule.nudge_sweeps == ga.schedule.nudge_sweeps
    assert gb.schedule.classes == ga.schedule.classes
    _one_error_line(*run_cli("compile", a, "-o", b, "--max-sweeps", "0"), "bad --max-sweeps 0")


def test_atomic_write_modes_and_interruption(tmp_path, monkeypatch):
    import os

    from epc.compiler import bundle
    old = os.umask(0o027)
    try:
        p = tmp_path / "sub" / "run.json"
        bundle.atomic_write_bytes(p, b"one")
        assert p.read_bytes() == b"one"
        assert p.stat().st_mode & 0o777 == 0o640        # what open() gives, not mkstemp's 0600
        os.chmod(p, 0o604)
        bundle.atomic_write_bytes(p, b"two")
        assert p.read_bytes() == b"two" and p.stat().st_mode & 0o777 == 0o604   # kept
    finally:
        os.umask(old)

    def fail(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle.os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        bundle.atomic_write_bytes(p, b"three")
    assert p.read_bytes() == b"two"                   # the old file survives whole
    assert sorted(x.name for x in p.parent.iterdir()) == ["run.json"]   # no temporary left


BAD_OPTIONS = [  # (Python API keyword, value, the CLI flag, its value)
    ("cost", "l1", "--cost", "l1"), ("neuron", "spiking", "--neuron", "spiking"),
    ("schedule", "async", "--schedule", "async"), ("tol", -1.0, "--tol", "-1"),
    ("max_sweeps", 0, "--max-sweeps", "0"), ("nudge_sweeps", 0, "--nudge-sweeps", "0"),
    ("mix", 1.5, "--mix", "1.5"), ("temperature", 0.0, "--temperature", "0"),
    ("tap_weight", -0.3, "--tap-weight", "-0.3"), ("skip_gain", 0.0, "--skip-gain", "0"),
    ("identity_skip", "zero", "--identity-skip", "zero"),
]


@pytest.mark.parametrize("kw,value,flag,text", BAD_OPTIONS)
def test_bad_compile_options_named_by_cli_and_api(run_cli, examples, tmp_path, kw, value,
                                                  flag, text):
    """One check (CompileOptions.check) serves both: the flag is named, nothing is written,
    and the API raises EpcError before any pass (not 'IR invalid after pass ...')."""
    import epc
    from epc.compiler.errors import EpcError
    src = examples / "mlp_digits.onnx"
    out = tmp_path / "m.epc"
    _one_error_line(*run_cli("compile", src, flag, text, "-o", out), f"bad {flag}")
    assert not out.exists()
    with pytest.raises(EpcError, match=f"^bad {flag} "):
        epc.compile(str(src), **{kw: value})


# --------------------------------------------------------------------------- issue 23
def _gated_model(path, lrn: bool = True, scale: float = 0.3, softmax: bool = False) -> str:
    """conv, HardSwish, a squeeze-excitation gate (GlobalAveragePool, conv, Sigmoid, Mul),
    conv, (LRN), HardSwish, Flatten, Gemm (, Softmax)."""
    r = np.random.default_rng(0)
    f = lambda n, *s: numpy_helper.from_array(r.normal(0, scale, s).astype(np.float32), n)  # noqa
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             mk("HardSwish", ["c1"], ["h1"], name="hswish1"),
             mk("GlobalAveragePool", ["h1"], ["s"], name="squeeze"),
             mk("Conv", ["s", "w2", "b2"], ["e"], name="excite"),
             mk("Sigmoid", ["e"], ["g"], name="gate"),
             mk("Mul", ["h1", "g"], ["m"], name="scale"),
             mk("Conv", ["m", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], name="conv2")]
    if lrn:
        nodes.append(mk("LRN", ["c3"], ["l"], size=3, name="lrn"))
    nodes += [mk("HardSwish", ["l" if lrn else "c3"], ["h3"], name="hswish2"),
              mk("Flatten", ["h3"], ["fl"], name="flat"),
              mk("Gemm", ["fl", "wf", "bf"], ["z" if softmax else "y"], transB=1, name="fc")]
    if softmax:
        nodes.append(mk("Softmax", ["z"], ["y"], axis=1, name="probs"))
    inits = [f("w1", 4, 2, 3, 3), f("b1", 4), f("w2", 4, 4, 1, 1), f("b2", 4),
             f("w3", 4, 4, 3, 3), f("b3", 4), f("wf", 3, 64), f("bf", 3)]
    g = helper.make_graph(nodes, "gated", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 2, 4, 4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(onnx.shape_inference.infer_shapes(m), str(path))
    return str(path)


def test_check_reports_every_op_and_writes_nothing(run_cli, examples, tmp_path):
    src = _gated_model(tmp_path / "gated.onnx")
    code, out, err = run_cli("compile", src, "--check")
    assert code == 2
    for line in ["translated: 6 ops: Conv x3, GlobalAveragePool x1, Flatten x1, Gemm x1",
                 "unsupported: 5 ops of 4 kinds:", "HardSwish x2 (first: node 'hswish1')",
                 "Sigmoid x1 (first: node 'gate')", "Mul x1 (first: node 'scale')",
                 "LRN x1 (first: node 'lrn')", "verdict: not compatible"]:
        assert line in out, line
    line = _one_error_line(code, out, err, "5 unsupported ops of 4 kinds",
                           "--substitute replaces HardSwish, Sigmoid, Mul")
    assert "LRN x1 (first: node 'lrn'" in line
    # without --check the refusal is the same one line, naming every op
    code, out, err = run_cli("compile", src, "-o", tmp_path / "g.epc")
    assert _one_error_line(code, out, err) == line
    # a compatible model: the report, exit 0
    code, out, _ = run_cli("compile", examples / "inception_digits.onnx", "--check")
    assert code == 0 and "Concat x1" in out and "compiled: 4 states, 5 couplings" in out
    assert "verdict: compatible" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gated.onnx"]
    # options keep their rules under --check
    code, out, err = run_cli("compile", src, "--check", "--max-sweeps", "0")
    _one_error_line(code, out, err, "bad --max-sweeps 0")
    code, out, err = run_cli("compile", src, "--check", "--memory-limit", "lots")
    _one_error_line(code, out, err, "--memory-limit")


def test_substitute_compiles_the_nearest_network_and_says_what_changed(run_cli, tmp_path):
    src = _gated_model(tmp_path / "gated.onnx", lrn=False)
    out_path = tmp_path / "g.epc"
    code, out, err = run_cli("compile", src, "--substitute", "--verify", "-o", out_path)
    assert code == 0, err
    text = out + err
    assert "HardSwish -> the clipped ReLU x2 (first: hswish1)" in text
    assert "squeeze-excitation gate dropped (x * gate -> x) x1 (first: scale)" in text
    m = re.search(r"deviates from the source: max relative error ([0-9.e+-]+), the same "
                  r"class on ([0-9.]+)% of 8 random inputs", text)
    assert m and float(m.group(1)) > 1e-3          # reported, not a failure
    assert out_path.exists()
    # LRN has no substitution: still refused, by name
    code, out, err = run_cli("compile", _gated_model(tmp_path / "lrn.onnx"), "--substitute",
                             "-o", tmp_path / "l.epc")
    _one_error_line(code, out, err, "LRN node 'lrn'", "no substitution")


def test_verify_compares_logits_before_a_dropped_softmax_at_any_scale(run_cli, tmp_path):
    """Weights of 1e10 give logits near 1e21 (light_resnet50's constant weights gave 1e31):
    the output Softmax is dropped by the compiler and --verify compares the logits, by
    the relative error max|a - b| / max|b|, which holds at any scale."""
    r = np.random.default_rng(0)
    w = lambda n, *s: numpy_helper.from_array((r.normal(0, 1, s) * 1e10).astype(np.float32), n)  # noqa
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["z"], transB=1),
             helper.make_node("Softmax", ["z"], ["y"], axis=1, name="probs")]
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 16])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 5])], [w("w1", 8, 16), w("w2", 5, 8)])
    src = str(tmp_path / "big.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    code, out, err = run_cli("compile", src, "--verify", "-o", tmp_path / "b.epc")
    assert code == 0, err
    m = re.search(r"verify: max relative error ([0-9.e+-]+) \(limit 1e-4\) OK", out + err)
    assert m and float(m.group(1)) < 1e-6


def test_accumulator_overflow_suggests_a_setting_that_fits(run_cli, tmp_path):
    """A 1024-input layer of weights near 3e3 overflows the core's 32-bit accumulator at
    the default 8 fractional bits by a fraction of a bit; cutting one bit is not enough
    (a left shift overflows next): the suggestion is the first setting whose program
    validates, and it does compile."""
    r = np.random.default_rng(0)
    w = numpy_helper.from_array((r.uniform(0.5, 1, (10, 1024)) * 3e3).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "big",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1024])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w])
    src = str(tmp_path / "ovf.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    code, out, err = run_cli("compile", src, "--target", "neuromorphic", "-o", tmp_path / "o.nc")
    line = _one_error_line(code, out, err, "overflows the 32-bit accumulator")
    m = re.search(r"it fits with (--frac-bits \d+)?( ?--weight-bits \d+)? \(that program "
                  r"validates\)", line)
    assert m, line
    flags = " ".join(x.strip() for x in m.groups() if x).split()
    code, out, err = run_cli("compile", src, "--target", "neuromorphic", *flags,
                             "-o", tmp_path / "o.nc")
    assert code == 0, err
    assert (tmp_path / "o.nc").exists()
