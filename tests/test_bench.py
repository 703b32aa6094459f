"""Smoke tests of the accuracy and parity benchmarks (the full runs live in `python -m bench`)."""
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bench.__main__ import AutogradBaseline
from bench.accuracy import main
from bench.backprop import ff_forward
from bench.parity import main as parity_main
from epc.compiler.options import CompileOptions
from epc.api import compile_source
from epc.runtime import zoo
from epc.runtime.data import load_dataset
from epc.runtime.engine import Engine
from epc.runtime.learn import ep_gradient


def test_accuracy_bench_smoke(tmp_path):
    out = tmp_path / "acc.json"
    assert main(["--models", "mlp_digits", "--epochs", "3", "--seeds", "0", "1",
                 "--bp-lrs", "2e-3", "5e-3", "--bp-wds", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rec = res["models"]["mlp_digits"]
    assert res["epochs"] == 3 and rec["settings"] == "defaults"
    assert [r["seed"] for r in rec["runs"]] == [0, 1]
    accs = [r["test_accuracy"] for r in rec["runs"]]
    for r in rec["runs"]:   # the misclassified test samples, from the trained checkpoint
        assert len(r["test_errors"]) == round((1 - r["test_accuracy"]) * 360)
    assert rec["test_accuracy"] == sum(accs) / 2 and rec["test_accuracy_min"] == min(accs)
    # three epochs of EP from the untrained example already separate digits (chance 0.1)
    assert 0.8 < rec["test_accuracy"] <= 1.0
    assert rec["target"] == 0.985 and rec["target_met"] == (rec["test_accuracy"] >= 0.985)
    # the backprop reference: same architecture, seeds and epochs, best lr by mean
    bp = rec["backprop"]
    assert sorted({r["lr"] for r in bp["runs"]}) == [2e-3, 5e-3] and len(bp["runs"]) == 4
    means = {lr: sum(r["test_accuracy"] for r in bp["runs"] if r["lr"] == lr) / 2
             for lr in (2e-3, 5e-3)}
    assert bp["lr"] == max(means, key=means.get) and bp["test_accuracy"] == means[bp["lr"]]
    assert 0.8 < bp["test_accuracy"] <= 1.0 and bp["epochs"] == 3
    for r in bp["runs"]:
        assert len(r["test_errors"]) == round((1 - r["test_accuracy"]) * 360)
        assert set(bp["always_wrong"]) <= set(r["test_errors"])
    assert rec["ep_minus_backprop"] == pytest.approx(rec["test_accuracy"] - bp["test_accuracy"])
    bpe = bp["energy_activations"]
    assert bp["activations"] == "source model" and bpe["activations"] == "energy form"
    assert len(bpe["runs"]) == 4 and 0.8 < bpe["test_accuracy"] <= 1.0
    assert rec["ep_minus_backprop_energy_activations"] == pytest.approx(
        rec["test_accuracy"] - bpe["test_accuracy"])


def test_accuracy_bench_implicit_reference(tmp_path):
    """--implicit trains the same compiled model with its exact gradient, same seeds."""
    out = tmp_path / "acc.json"
    assert main(["--models", "mlp_digits", "--epochs", "2", "--seeds", "0", "--no-backprop",
                 "--implicit", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())["models"]["mlp_digits"]
    imp = rec["implicit"]
    assert [r["seed"] for r in imp["runs"]] == [0]
    r = imp["runs"][0]
    assert 0.8 < r["test_accuracy"] <= 1.0 and imp["test_accuracy"] == r["test_accuracy"]
    assert r["steps"] == 90 and r["skipped_steps"] == 0    # 2 epochs of ceil(1437 / 32)
    assert r["excluded_samples"] == 0       # the MLP's every sample has a stable fixed point
    assert len(r["test_errors"]) == round((1 - r["test_accuracy"]) * 360)
    assert rec["ep_minus_implicit"] == pytest.approx(rec["test_accuracy"] - r["test_accuracy"])
    assert "backprop" not in rec


@pytest.mark.parametrize("name", ["mlp3_digits", "conv_digits", "conv1_digits"])
def test_backprop_reference_runs_the_network_the_example_file_holds(name):
    """bench.backprop trains the feedforward form of the compiled graph: on the untrained
    example it must compute what onnxruntime computes from the ONNX file."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", f"{name}.onnx")
    eng = Engine(compile_source(path, CompileOptions()).graph)
    x = load_dataset("digits", input_shape=eng.input_shapes[eng.inputs[0]]).test.x[:64]
    want = ort.InferenceSession(path).run(None, {"input": x.numpy()})[0]
    got = ff_forward(eng, x, eng.params).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # with the energy form's activations (clip to [0, 1]) it is a different function once
    # pre-activations pass 1 (weights scaled up; at init they seldom do)
    acts = {eng.states[j].act.kind for j in eng.settled if j != eng.output}
    big = {k: v * 4 for k, v in eng.params.items()}
    relu, clipped = ff_forward(eng, x, big), ff_forward(eng, x, big, energy_acts=True)
    assert acts == {"clip"} and not torch.allclose(relu, clipped, atol=1e-2)


def test_backprop_reference_keeps_relu6():
    """A ReLU6 network (mobilenet_cifar) is trained by the backprop reference as ReLU6: its
    feedforward form matches onnxruntime where pre-activations pass 6 (inputs scaled up)."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples",
                        "mobilenet_cifar.onnx")
    eng = Engine(compile_source(path, CompileOptions()).graph)
    x = torch.rand((8,) + eng.input_shapes[eng.inputs[0]],
                   generator=torch.Generator().manual_seed(0)) * 20
    want = ort.InferenceSession(path).run(None, {"input": x.numpy()})[0]
    got = ff_forward(eng, x, eng.params).numpy()
    assert {eng.states[j].source_act.kind for j in eng.settled} == {"clip", "identity"}
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_parity_bench_smoke(tmp_path):
    out = tmp_path / "parity.json"
    assert parity_main(["--models", "mlp_digits", "--epochs", "2", "--onchip-epochs", "1",
                        "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rec = res["models"]["mlp_digits"]
    assert 0.7 < rec["float_test_accuracy"] <= 1.0
    w8, w4 = rec["w8"], rec["w4_calibrated"]
    # 8-bit weights and states track the float runtime closely even on a half-trained net
    assert w8["agreement"] >= 0.97 and abs(w8["points_below_float"]) <= 2.0
    assert w4["agreement"] >= 0.85
    for r in (w8, w4):
        assert r["overflows"] == 0 and r["cycling"] == 0 and r["unsettled"] == 0
    oc = res["onchip_mlp_digits"]
    assert oc["epochs"] == 1 and 0.5 < oc["test_accuracy"] <= 1.0
    assert rec["float_train"]["reused_from_accuracy_run"] is False


def test_full_bench_hands_accuracy_runs_to_parity(tmp_path):
    """In one `python -m bench`, parity quantizes the float run the accuracy section
    trained (same settings, seed 0) instead of training it again."""
    from bench.__main__ import main as bench_main
    out = tmp_path / "b.json"
    assert bench_main(["--quick", "--only", "accuracy", "parity", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    run = res["accuracy"]["models"]["mlp_digits"]["runs"][0]
    par = res["parity"]["models"]["mlp_digits"]
    assert par["float_train"]["reused_from_accuracy_run"] is True
    assert par["float_train"]["test_accuracy"] == run["test_accuracy"]
    # the reused bundle is the trained one: the float runtime's accuracy on it is the same
    assert par["float_test_accuracy"] == run["test_accuracy"]


@pytest.mark.parametrize("graph", [lambda: zoo.mlp((64, 32, 16, 10)),
                                   lambda: zoo.convnet(channels=(4, 6))], ids=["mlp", "conv"])
def test_throughput_baseline_computes_what_the_runtime_computes(graph):
    """The autograd baseline of the throughput bench (drives = autograd of Phi over the
    reference ops) makes the runtime's synchronous updates and its EP gradient, so the
    speed-up compares equal work."""
    eng = Engine(graph(), dtype=torch.float64, mode="sync", pool_freeze=None)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((8,) + eng.input_shapes[eng.inputs[0]], generator=g, dtype=torch.float64)
    y = torch.arange(8) % 10
    batch = eng.prepare(x)
    base = AutogradBaseline(eng)
    s0 = base.settle(batch, base.zeros(8), 0.0, y, 12)
    r0 = eng.settle(batch, max_sweeps=12, tol=0.0)
    sp = base.settle(batch, dict(s0), 0.3, y, 5)
    sm = base.settle(batch, dict(s0), -0.3, y, 5)
    rp, rm = (eng.settle(batch, r0.states, beta=b, labels=y, max_sweeps=5, tol=0.0)
              for b in (0.3, -0.3))
    for a, b in ((s0, r0.states), (sp, rp.states), (sm, rm.states)):
        for j in eng.settled:
            torch.testing.assert_close(a[j], b[j], rtol=0, atol=1e-12)
    assert max(float((sp[j] - s0[j]).abs().max()) for j in eng.settled) > 1e-4
    grads = ep_gradient(eng, batch, rp.states, rm.states, 0.3)
    before = {k: v.clone() for k, v in eng.params.items()}

    class Record:
        def step(self, gr):
            self.grads = gr

    rec = Record()
    base.step(x, y, 12, 5, 0.3, rec)
    assert set(rec.grads) == set(grads)
    for k, v in grads.items():
        torch.testing.assert_close(rec.grads[k], v, rtol=1e-9, atol=1e-12)
    assert all(torch.equal(eng.params[k], before[k]) for k in before)


def test_timing_sections_smoke(tmp_path):
    """`python -m bench --quick --only ...`: the timing sections run and report what the
    docs/results.md quotes (ratios from side-by-side pairs)."""
    from bench.__main__ import main as bench_main
    out = tmp_path / "b.json"
    assert bench_main(["--quick", "--only", "sweeps", "throughput", "ep_vs_bp", "gflops",
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"sweeps", "throughput", "ep_vs_bp", "gflops"}
    assert "accuracy" not in res and "parity" not in res
    sw = res["sweeps"]["chain5"]
    assert sw["colour"]["sweeps"] < sw["sync"]["sweeps"]
    tp = res["throughput"]["mlp_digits"]
    assert len(tp["speedup_all"]) == 5 and tp["speedup"] > 0
    assert tp["runtime_samples_per_s"] > 0 and tp["baseline_samples_per_s"] > 0
    assert tp["runtime_conv_fraction"] == 0 and tp["speedup_ceiling_convs"] is None  # an MLP
    eb = res["ep_vs_bp"]["mlp_digits"]
    assert len(eb["ratio_all"]) == 5 and eb["ep_epoch_s"] > 0 and eb["bp_epoch_s"] > 0
    assert 0 < res["gflops"]["models"]["mlp_digits"]["fraction_of_peak"]
    # the allocator both sides ran under (runtime/memory.py), the same as `epc train`'s
    from epc.runtime.memory import retain_freed_memory
    assert res["machine"]["allocator"] == retain_freed_memory()


def test_precision_bench_smoke():
    """bench.precision: one epoch of mlp_digits at each precision, side by side, from the
    same initial weights; the 16-bit epochs learn as the float32 one does."""
    from bench.precision import bench_precision
    res = bench_precision(reps=1, names=["mlp_digits"], log=lambda *a: None)
    rec = res["nets"]["mlp_digits"]
    assert set(rec["speedup"]) == {"bf16", "fp16"} and all(v > 0 for v in rec["speedup"].values())
    acc = {p: h["test_accuracy"] for p, h in rec["first_epoch"].items()}
    assert acc["fp32"] > 0.3 and all(abs(acc[p] - acc["fp32"]) < 0.05 for p in ("bf16", "fp16"))
    assert rec["first_epoch"]["bf16"]["train_loss"] != rec["first_epoch"]["fp32"]["train_loss"]


def test_coverage_survey_rows_say_what_compiled_and_what_was_refused(tmp_path):
    """bench.coverage on two of its stand-in architectures through the PyTorch frontend:
    MobileNetV3's HardSwish and squeeze-excitation gate are refused by the check, then
    compiled with --substitute, the change and the deviation reported; ConvNeXt is refused
    with every blocking op counted (LayerNorm, the channels-last Linear, GELU)."""
    from bench.coverage import run_one, summary, table
    torch.set_num_threads(1)
    mob = run_one("torch", {"lib": "builtin", "name": "mobilenet_v3_mini", "size": 32})
    assert mob["status"] == "substituted"
    assert mob["unsupported"] == {"aten.hardswish.default": 4, "aten.mul.Tensor": 1}
    assert "HardSwish -> the clipped ReLU x4" in mob["substituted"]
    assert "squeeze-excitation gate dropped" in mob["substituted"]
    assert mob["verify_error"] > 1e-3 and 0 <= mob["agreement"] <= 1   # reported, not checked
    cnx = run_one("torch", {"lib": "builtin", "name": "convnext_mini", "size": 32})
    assert cnx["status"] == "refused"
    assert cnx["unsupported"] == {"aten.native_layer_norm.default": 2,
                                  "aten.linear.default": 2, "aten.gelu.default": 1}
    assert "5 unsupported ops of 3 kinds" in cnx["error"]
    rows = {"builtin:mobilenet_v3_mini@32": {"torch": mob},
            "builtin:convnext_mini@32": {"torch": cnx}}
    assert summary(rows) == {"builtin torch": {"substituted": 1, "refused": 1}}
    t = table(rows)
    assert "refused: aten.native_layer_norm.default x2, aten.linear.default x2" in t
    assert "--substitute: deviation" in t
