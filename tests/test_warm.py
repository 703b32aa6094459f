"""Warm conversion and trained teachers (issue 21, items 2 and 6): `epc backprop` trains a
compiled graph's feedforward form by backprop and writes the trained bundle and an ONNX
teacher; `epc train` reports the free phase before any EP step (`initial`); `--teacher
source` on an untrained source says it teaches nothing; a teacher of another shape is
refused in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import epc
from epc.compiler.bundle import read_bundle
from epc.compiler.errors import EpcError
from epc.runtime import zoo
from epc.runtime.backprop import ff_evaluate, ff_forward, onnx_bytes, trainable_params
from epc.runtime.data import load_dataset
from epc.runtime.engine import Engine
from epc.targets.torch import emit
from conftest import one_error_line


_line = one_error_line


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = tmp_path_factory.mktemp("warm") / "mlp.epc"
    emit(zoo.mlp((64, 24, 10), max_sweeps=40, nudge_sweeps=12), p, None)
    return p


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", input_shape=(64,), num_classes=10)


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    """`epc backprop` run once through the CLI (in-process): the files and metrics."""
    from epc.cli import main
    d = tmp_path_factory.mktemp("bp")
    out, onnx, mj = d / "bp.epc", d / "teacher.onnx", d / "bp.json"
    code = main(["backprop", str(model), "--epochs", "4", "-o", str(out), "--onnx", str(onnx),
                 "--metrics-json", str(mj), "-q"])
    assert code == 0
    return out, onnx, json.loads(mj.read_text())


def test_backprop_learns_and_writes_the_trained_weights(model, trained, digits):
    out, _, m = trained
    assert m["loss"] == "mse"            # the zoo graph's label cost: what EP goes on with
    assert m["initial"]["test_accuracy"] < 0.3 and m["test_accuracy"] > 0.85, m
    assert len(m["history"]) == 4 and m["history"][-1]["test_accuracy"] == m["test_accuracy"]
    before, after = read_bundle(model).graph, read_bundle(out).graph
    assert read_bundle(out).target == "torch"
    changed = [k for k in before.weights if not np.array_equal(before.weights[k],
                                                                after.weights[k])]
    assert sorted(changed) == sorted(Engine(before).learnable)
    # the written weights are the ones whose accuracy was reported
    eng = Engine(after)
    ev = ff_evaluate(eng, digits.test.x, digits.test.y, trainable_params(eng),
                     energy_acts=True)
    assert ev["accuracy"] == m["test_accuracy"]
    assert read_bundle(out).meta["backprop"]["epochs"] == 4


def test_converted_accuracy_is_the_free_phase_that_train_starts_from(trained):
    out, _, m = trained
    ev = epc.evaluate(out, data="digits")
    assert ev["accuracy"] == m["converted"]["test_accuracy"]
    t = epc.train(out, data="digits", epochs=1, lr=1e-4)
    assert t["initial"]["test_accuracy"] == ev["accuracy"]
    assert t["initial"]["epoch"] == 0


def test_onnx_teacher_computes_the_trained_net(trained, digits):
    """The exported model, run by onnxruntime, gives the feedforward logits of the trained
    bundle, and epc's ONNX frontend reads it back."""
    import onnxruntime as ort
    out, onnx, _ = trained
    eng = Engine(read_bundle(out).graph)
    x = digits.test.x[:50]
    want = ff_forward(eng, x, eng.params, energy_acts=True).numpy()
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() < 1e-4
    g = epc.compile(onnx, verify=True)
    assert g.is_energy


def test_cli_and_api_backprop_are_the_same_run(model, trained, tmp_path):
    out, _, m = trained
    api_out = tmp_path / "api.epc"
    r = epc.backprop(model, epochs=4, output=api_out)
    assert r["test_accuracy"] == m["test_accuracy"]
    a, b = read_bundle(out).graph.weights, read_bundle(api_out).graph.weights
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_backprop_loss_choice(model):
    ce = epc.backprop(model, epochs=1, loss="ce")
    mse = epc.backprop(model, epochs=1)
    assert (ce["loss"], mse["loss"]) == ("ce", "mse")
    assert ce["test_loss"] != mse["test_loss"]


def test_backprop_bad_input_is_one_line(run_cli, model, tmp_path, program_path):
    assert _line(*run_cli("backprop", model, "--activations", "relu")[::2]) == \
        "bad --activations 'relu' (supported: energy, source)"
    assert _line(*run_cli("backprop", model, "--loss", "hinge")[::2]) == \
        "bad --loss 'hinge' (supported: graph, ce, mse)"
    assert _line(*run_cli("backprop", model, "--lr", "0")[::2]).startswith("bad --lr 0")
    assert "-o" in _line(*run_cli("backprop", model, "-o", model)[::2])
    same = tmp_path / "x.onnx"
    assert "--onnx" in _line(*run_cli("backprop", model, "-o", same, "--onnx", same)[::2])
    assert "neuromorphic program" in _line(*run_cli("backprop", program_path)[::2])
    assert "no such file" in _line(*run_cli("backprop", tmp_path / "missing.epc")[::2])
    assert not same.exists()


@pytest.fixture(scope="module")
def program_path(model, tmp_path_factory):
    p = tmp_path_factory.mktemp("prog") / "mlp.nc"
    epc.compile(model, target="neuromorphic", output=p)
    return p


def test_initial_measurement_leaves_the_run_unchanged(examples, monkeypatch):
    """The free phase measured before any EP step changes nothing of the run: the same
    bits as a run without it (the same-bits baselines hold). It is taken under a forked
    RNG, a guard for neurons that would draw while settling (none does today)."""
    from epc.runtime.train import Trainer
    g = epc.compile(examples / "mlp_digits.onnx", max_sweeps=20, nudge_sweeps=8)
    a = epc.train(g, epochs=2, seed=3)
    monkeypatch.setattr(Trainer, "measure_initial", lambda self: {"test_accuracy": 0.0})
    b = epc.train(g, epochs=2, seed=3)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["initial"]["test_accuracy"] > 0.0 and b["initial"] == {"test_accuracy": 0.0}
    assert a["initial"]["test_accuracy"] == epc.evaluate(g, max_sweeps=20)["accuracy"]


def test_initial_survives_resume(model, tmp_path):
    ck = tmp_path / "ck"
    m1 = epc.train(model, epochs=2, stop_after=1, checkpoint=ck)
    m2 = epc.train(model, epochs=2, checkpoint=ck, resume=True)
    assert m2["initial"] == m1["initial"]


def test_warm_conversion_at_feedback_regulation_keeps_the_bp_accuracy(examples, tmp_path):
    """At --feedback-gain auto (0.1 for deep nets) the fixed point stays near the
    feedforward pass: the converted 3-hidden MLP is within 2 test digits of backprop
    before any EP step (measured 98.33% = backprop after 20 epochs; at gain 1: 66.7%)."""
    g = epc.compile(examples / "mlp3_digits.onnx", feedback_gain="auto")
    m = epc.backprop(g, epochs=6)
    assert m["test_accuracy"] > 0.9
    n = m["test_samples"]
    assert m["converted"]["test_accuracy"] >= m["test_accuracy"] - 2 / n, m["converted"]


# --------------------------------------------------------------------------- teachers
def test_untrained_teacher_source_warns(run_cli, examples, tmp_path):
    code, _, err = run_cli("compile", examples / "mlp3_digits.onnx", "--teacher", "source",
                           "-o", tmp_path / "a.epc")
    warn = [l for l in err.splitlines() if l.startswith("epc: warning:")]
    assert code == 0 and len(warn) == 1 and "teaches nothing" in warn[0], err
    # a BP-trained source: no warning
    code, _, err = run_cli("compile", examples / "conv_digits_teacher.onnx", "--teacher",
                           "source", "-o", tmp_path / "b.epc")
    assert code == 0 and "warning" not in err, err
    # the API returns the same line
    r = epc.api.compile_result(examples / "mlp3_digits.onnx", teacher="source")
    assert len(r.warnings) == 1 and "teaches nothing" in r.warnings[0]
    assert epc.api.compile_result(examples / "mlp3_digits.onnx").warnings == []


def test_a_backprop_exported_teacher_is_not_untrained(trained, examples, tmp_path, run_cli):
    _, onnx, _ = trained
    from epc.sources import load_source, looks_untrained
    assert not looks_untrained(load_source(str(onnx)).graph)
    assert looks_untrained(load_source(str(examples / "mlp_digits.onnx")).graph)
    code, _, err = run_cli("compile", onnx, "--teacher", "source", "-o", tmp_path / "t.epc")
    assert code == 0 and "warning" not in err


def test_teacher_of_another_shape_is_one_line(run_cli, examples, tmp_path):
    five = tmp_path / "five.onnx"
    five.write_bytes(onnx_bytes(zoo.mlp((64, 12, 5))))
    line = _line(*run_cli("compile", examples / "mlp_digits.onnx", "--teacher", five,
                          "-o", tmp_path / "x.epc")[::2])
    assert "teacher output [5] differs from the model's output [10]" in line, line
    line = _line(*run_cli("compile", examples / "mlp_digits.onnx", "--teacher",
                          examples / "conv_digits_teacher.onnx", "-o", tmp_path / "y.epc")[::2])
    assert "teacher inputs [[1, 8, 8]] differ from the model's [[64]]" in line, line
    with pytest.raises(EpcError, match="teacher output"):
        epc.compile(examples / "mlp_digits.onnx", teacher=str(five))
    assert not (tmp_path / "x.epc").exists() and not (tmp_path / "y.epc").exists()


def test_teacher_module_spec_takes_the_students_input(run_cli, examples, tmp_path):
    """A `file.py:factory` teacher needs no --input-shape: it is traced on the student's
    input; one whose first layer expects another width is one error line naming it."""
    spec = tmp_path / "teachers.py"
    spec.write_text("import torch\n"
                    "def fits():\n"
                    "    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),\n"
                    "                               torch.nn.Linear(32, 10))\n"
                    "def wide():\n"
                    "    return torch.nn.Sequential(torch.nn.Linear(100, 10))\n")
    out = tmp_path / "s.epc"
    code, _, err = run_cli("compile", examples / "mlp_digits.onnx", "--teacher",
                           f"{spec}:fits", "-o", out)
    assert code == 0, err
    tw = [k for k in read_bundle(out).graph.weights if k.startswith("teacher.")]
    assert len(tw) == 4, tw      # the teacher's two weights and two biases
    code, _, err = run_cli("compile", examples / "mlp_digits.onnx", "--teacher",
                           f"{spec}:wide", "-o", tmp_path / "w.epc")
    line = _line(code, err)
    assert "wide" in line, line
    assert not (tmp_path / "w.epc").exists()


def test_backprop_leaves_a_teacher_alone(trained, examples, tmp_path):
    """A graph compiled with --teacher: backprop trains the student only; the teacher's
    weights stay as they were and the ONNX export holds the student alone."""
    import onnx as onnx_lib
    _, teacher, _ = trained
    g = epc.compile(examples / "mlp_digits.onnx", teacher=str(teacher))
    out, exported = tmp_path / "s.epc", tmp_path / "s.onnx"
    epc.backprop(g, epochs=1, output=out, onnx=exported)
    after = read_bundle(out).graph.weights
    tw = [k for k in g.weights if k.startswith("teacher.")]
    assert tw and all(np.array_equal(g.weights[k], after[k]) for k in tw)
    student = [k for k in g.weights if not k.startswith("teacher.")]
    assert all(not np.array_equal(g.weights[k], after[k]) for k in student)
    assert len(onnx_lib.load(str(exported)).graph.initializer) == len(student)
