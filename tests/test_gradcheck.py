"""check-gradients: the EP estimate against implicit differentiation, per coupling."""
from __future__ import annotations

import os

import pytest
import torch

from epc.runtime import zoo
from epc.runtime.api import check_gradients
from epc.runtime.engine import Engine
from epc.runtime.gradcheck import check_gradients as engine_check, implicit_gradient

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _min_cos(r):
    return min(c["cosine"] for c in r["couplings"] + r["biases"])


@pytest.mark.parametrize("name,graph", [
    ("mlp", lambda: zoo.mlp((64, 64, 10))),
    ("mlp3", lambda: zoo.mlp((64, 64, 32, 16, 10))),
    ("conv_max", lambda: zoo.convnet(channels=(8, 16))),
    ("resnet", lambda: zoo.resnet(width=32)),
    ("tap", lambda: zoo.with_tap(zoo.mlp((64, 64, 32, 10)), "h1")),
    ("teacher", lambda: zoo.with_teacher(zoo.mlp((64, 64, 10)))),
    ("ce", lambda: zoo.mlp((64, 64, 10), cost="ce")),
])
def test_symmetric_ep_matches_implicit_gradient(name, graph):
    r = check_gradients(graph(), data="digits", beta=0.01, samples=32)
    assert r["unconverged"] == 0
    kinds = {c["kind"] for c in r["couplings"]}
    assert len(r["couplings"]) >= 2 and r["biases"]
    if name == "tap":
        assert "tap" in kinds
    for c in r["couplings"] + r["biases"]:
        assert c["cosine"] >= 0.99, (name, c)
        assert 0.95 <= c["norm_ratio"] <= 1.05, (name, c)


def test_one_sided_is_worse_than_symmetric():
    g = zoo.mlp((64, 64, 32, 10))
    sym = check_gradients(g, beta=0.05, samples=32)
    one = check_gradients(g, beta=0.05, samples=32, nudge="one-sided")
    err = lambda r: max(abs(1 - c["norm_ratio"]) + (1 - c["cosine"]) for c in r["couplings"])
    assert err(sym) < err(one)


@pytest.mark.parametrize("feedback", [True, False])
def test_implicit_gradient_matches_backprop_through_long_settling(feedback):
    """The reference itself: implicit diff == autograd through many unrolled sweeps of the
    runtime's settling; also for a graph compiled without feedback (`--no-feedback`), whose
    settling is the feedforward pass and whose implicit gradient is backprop's."""
    g = zoo.mlp((64, 16, 10))
    for c in g.couplings:
        c.feedback = c.feedback and feedback
    eng = Engine(g, dtype=torch.float64)
    x = torch.rand(8, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    batch = eng.prepare(x)
    free = eng.settle(batch, max_sweeps=2000, tol=1e-12)
    imp, info = implicit_gradient(eng, batch, free.states, y)
    # unrolled: settle from zero with autograd on (hot loop is differentiable)
    names = eng.learnable
    saved = dict(eng.params)
    leaves = {k: eng.params[k].clone().requires_grad_(True) for k in names}
    eng.params.update(leaves)
    with torch.enable_grad():
        b2 = eng.prepare(x)
        r = eng.settle(b2, max_sweeps=300, tol=0.0)
        loss = eng.loss(r.states, b2, y).mean()
        grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    eng.params.update(saved)
    for k, gk in zip(names, grads):
        torch.testing.assert_close(imp[k], gk, rtol=1e-6, atol=1e-9)


def test_json_shape_and_bad_beta(tmp_path):
    from epc.compiler.errors import EpcError
    out = tmp_path / "g.json"
    r = check_gradients(zoo.mlp((64, 16, 10)), beta=0.01, samples=8, json_path=str(out))
    import json
    j = json.loads(out.read_text())
    assert {"name", "cosine", "norm_ratio", "sign_agreement"} <= set(j["couplings"][0])
    assert j["couplings"][0]["cosine"] == pytest.approx(r["couplings"][0]["cosine"])
    assert r["warnings"] == [] and j["warnings"] == []
    with pytest.raises(EpcError, match="beta"):
        check_gradients(zoo.mlp((64, 16, 10)), beta=0.0)


def _compiled(name):
    try:
        from epc.compiler.options import CompileOptions
        from epc.api import compile_source
    except ImportError:
        pytest.skip("compile pipeline not available")
    path = os.path.join(ROOT, "examples", f"{name}.onnx")
    if not os.path.exists(path):
        pytest.skip(f"{path} missing")
    return compile_source(path, CompileOptions()).graph


@pytest.mark.parametrize("name", ["mlp_digits", "mlp3_digits", "conv_digits", "conv1_digits"])
def test_real_examples_at_initialisation(name):
    g = _compiled(name)
    r = check_gradients(g, beta=0.01, samples=16 if name.startswith("conv") else 32)
    assert r["unconverged"] == 0
    assert _min_cos(r) >= 0.99, r["couplings"]


def test_hopfield_resnet13_gradient_does_not_vanish():
    """The seed paper's deep layout (examples/build_examples.py:hopfield_resnet13_digits,
    9 states): EP matches the implicit gradient at init on every coupling, and the true
    gradient's norm spreads over less than two orders across couplings (ResNet-13's
    spans seven, docs/findings.md, deep nets)."""
    import epc
    g = epc.compile(os.path.join(ROOT, "examples", "build_examples.py") +
                    ":hopfield_resnet13_digits", input_shape=(1, 3, 8, 8), feedback_gain=1)
    # symmetric feedback, as the seed paper's layout: under auto's gains (0.1 a level) the
    # smallest cosine measured 0.9875 (h1's input coupling: its nudge is ~0.1^8 beta)
    r = check_gradients(g, beta=0.01, samples=8, channels=3)
    assert r["unconverged"] == 0
    assert _min_cos(r) >= 0.99, r["couplings"]
    norms = [c["true_norm"] for c in r["couplings"] if c["kind"] != "bias"]
    assert len(norms) == 13 and max(norms) / min(norms) < 100, norms


def test_unsettled_phases_are_warned_about(cli, tmp_path):
    """A sweep cap too low for the tolerance leaves phases unsettled, where neither the EP
    estimate nor the implicit gradient means anything: the result says so (and the CLI
    prints it on stderr) instead of showing a table as if it held."""
    from epc.targets.torch import emit
    r = check_gradients(zoo.mlp((64, 16, 10)), beta=0.01, samples=8, max_sweeps=2)
    assert r["unconverged"] > 0
    assert any("did not settle" in w and "--max-sweeps 2" in w for w in r["warnings"])
    p = tmp_path / "m.epc"
    emit(zoo.mlp((64, 16, 10)), p, None)
    res = cli("check-gradients", p, "--samples", "8", "--max-sweeps", "2")
    assert res.exit_code == 0
    assert "epc: warning:" in res.stderr and "did not settle" in res.stderr


def test_a_diverging_adjoint_iteration_stops_early_and_says_so(monkeypatch):
    """Around a state where the sweep expands (linear states, couplings scaled up), the
    adjoint iteration cannot converge: it stops once its change has grown a thousandfold,
    long before the iteration budget, and reports `converged` false; check-gradients then
    warns that its 'true' column is not the gradient."""
    from epc.compiler.ir import Activation
    from epc.runtime import gradcheck
    from epc.runtime.data import load_dataset
    from epc.runtime.gradcheck import DIVERGE_AFTER
    g = zoo.mlp((64, 32, 32, 10), act=Activation.identity())
    for k in ("h2.w", "out.w"):
        g.weights[k] = g.weights[k] * 8.0
    eng = Engine(g)
    d = load_dataset("digits", input_shape=(64,))
    batch = eng.prepare(d.train.x[:8])
    zeros = {j: torch.zeros((8,) + eng.shapes[j]) for j in eng.settled}
    _, info = implicit_gradient(eng, batch, zeros, d.train.y[:8], iters=2000, tol=1e-9)
    assert not info["converged"]
    assert DIVERGE_AFTER < info["iterations"] < 200, info
    # a contracting net converges, and says so
    eng = Engine(zoo.mlp((64, 32, 10)))
    batch = eng.prepare(d.train.x[:8])
    free = eng.settle(batch, max_sweeps=2000, tol=1e-7)
    _, info = implicit_gradient(eng, batch, free.states, d.train.y[:8])
    assert info["converged"] and info["iterations"] < 2000
    # check-gradients does not show an unconverged 'true' column as if it held
    capped = lambda *a, **k: implicit_gradient(*a, **{**k, "iters": 1})  # noqa: E731
    monkeypatch.setattr(gradcheck, "implicit_gradient", capped)
    r = engine_check(eng, d.train.x[:8], d.train.y[:8], beta=0.01)
    assert any("adjoint iteration did not converge" in w for w in r["warnings"]), r["warnings"]


def test_drop_samples_leaves_out_only_the_samples_off_a_stable_fixed_point():
    """The adjoint system is block-diagonal over the batch. In a net whose feedback loop
    expands wherever its hidden units are unclipped, a blank image (hidden drive at the
    middle of [0, 1]) sits on an unstable point, while digits, driven far below 0 by
    negative input weights, saturate every hidden unit (a nilpotent sweep Jacobian). With
    `drop_samples` the blank samples are left out and the gradient is exactly the one of
    the digits alone; without it the whole batch's iteration diverges."""
    from epc.runtime.data import load_dataset
    g = zoo.mlp((64, 32, 10))
    g.weights["h1.w"] = -abs(g.weights["h1.w"]) * 20.0
    g.weights["h1.b"] = g.weights["h1.b"] * 0.0 + 0.5
    g.weights["out.w"] = g.weights["out.w"] * 8.0      # loop gain |W|^2 far above 1
    eng = Engine(g)
    d = load_dataset("digits", input_shape=(64,))
    digits, labels = d.train.x[:6], d.train.y[:6]
    x = torch.cat([digits, torch.zeros(3, 64)])
    y = torch.cat([labels, labels[:3]])

    def states(n):    # hidden units at 0.5 with out = 0: the blanks' drive stays at 0.5
        return {"h1": torch.full((n, 32), 0.5), "out": torch.zeros(n, 10)}

    mixed, info = implicit_gradient(eng, eng.prepare(x), states(9), y, drop_samples=True)
    assert info["converged"] and info["dropped"] == 3
    assert info["kept"].tolist() == [True] * 6 + [False] * 3
    alone, ainfo = implicit_gradient(eng, eng.prepare(digits), states(6), labels)
    assert ainfo["converged"]
    # (the saturated hidden layer passes nothing on: only the output bias has a gradient)
    assert alone["out.b"].abs().max() > 0.01
    for k in alone:
        torch.testing.assert_close(mixed[k], alone[k], rtol=1e-5, atol=1e-7)
    _, whole = implicit_gradient(eng, eng.prepare(x), states(9), y)
    assert not whole["converged"]
    # no sample left: nothing to differentiate, and it says so
    _, none = implicit_gradient(eng, eng.prepare(x[6:]), states(3), y[6:], drop_samples=True)
    assert not none["converged"] and none["dropped"] == 3
