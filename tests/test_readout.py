"""Readout heads outside the energy (`epc compile --readout`): IR, settling, EP gradient.

References: on a one-hidden-layer MLP the free phase is the feedforward pass, so the EP
estimate must equal backprop's gradient of the cost; on deeper and conv nets it must match
the implicit gradient of `check-gradients` (which evaluates heads by their own code path).
"""
from __future__ import annotations

import pytest
import torch

from epc.compiler.errors import EpcError
from epc.compiler.options import CompileOptions
from epc.compiler.passes import readout
from epc.api import compile_source
from epc.compiler.text import parse, print_graph
from epc.compiler.verify import problems
from epc.runtime import zoo
from epc.runtime.api import check_gradients
from epc.runtime.data import load_dataset
from epc.runtime.engine import Engine
from epc.runtime.learn import ep_gradient

torch.set_num_threads(1)


def with_readout(g):
    return readout.run(g, CompileOptions(readout=True))


def test_pass_marks_heads_and_drops_their_feedback(examples):
    g = compile_source(str(examples / "mlp3_digits.onnx"),
                       CompileOptions(readout=True, taps="auto", cost="ce")).graph
    heads = {s.name for s in g.states if s.readout}
    assert heads == {"out", "tap_h2"}
    for c in g.couplings:
        assert c.feedback == (c.dst not in heads and c.src not in ("input",)), c.name
    # the textual IR round-trips the flag; graphs without heads print as before
    text = print_graph(g)
    assert text.count("readout=true") == 2 and print_graph(parse(text)) == text
    plain = compile_source(str(examples / "mlp3_digits.onnx"), CompileOptions()).graph
    assert "readout" not in print_graph(plain)


def test_verifier_rejects_malformed_heads():
    g = with_readout(zoo.mlp((8, 6, 4)))
    assert problems(g) == []
    bad = g.copy()
    next(c for c in bad.couplings if c.dst == "out").feedback = True
    assert any("must have no feedback" in p for p in problems(bad))
    bad = g.copy()
    next(s for s in bad.states if s.name == "h1").readout = True
    assert any("must be an output or tap" in p for p in problems(bad))
    clipped = zoo.mlp((8, 6, 4))
    clipped.output_state().act = clipped.states[0].act
    with pytest.raises(EpcError, match="a readout is linear"):
        with_readout(clipped)


def test_free_phase_of_one_hidden_mlp_is_the_feedforward_pass():
    eng = Engine(with_readout(zoo.mlp((64, 32, 10))), dtype=torch.float64)
    x = torch.rand(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = eng.settle(eng.prepare(x), max_sweeps=50, tol=1e-12)
    P = eng.params
    w1, w2 = (P[l.weight] for l in eng.links)
    h = torch.clamp(x @ w1.t() + P[eng.states["h1"].bias], 0, 1)
    torch.testing.assert_close(r.states["h1"], h, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.states["out"], h @ w2.t() + P[eng.states["out"].bias],
                               rtol=0, atol=1e-12)
    assert r.sweeps <= 3


@pytest.mark.parametrize("cost", ["ce", "mse"])
@pytest.mark.parametrize("nudge", ["symmetric", "one-sided"])
def test_ep_equals_backprop_on_a_one_hidden_mlp(cost, nudge):
    eng = Engine(with_readout(zoo.mlp((64, 32, 10), cost=cost)), dtype=torch.float64)
    d = load_dataset("digits", input_shape=(64,))
    x, y = d.train.x[:32].double(), d.train.y[:32]
    batch = eng.prepare(x)
    free = eng.settle(batch, max_sweeps=100, tol=1e-13)
    beta = 1e-4
    plus = eng.settle(batch, free.states, beta=beta, labels=y, max_sweeps=200, tol=1e-13)
    other = (eng.settle(batch, free.states, beta=-beta, labels=y, max_sweeps=200, tol=1e-13)
             if nudge == "symmetric" else free)
    ep = ep_gradient(eng, batch, plus.states, other.states, beta,
                     one_sided=nudge == "one-sided", labels=y)
    P = {k: v.clone().requires_grad_(True) for k, v in eng.params.items()}
    (l1, l2) = eng.links
    h = torch.clamp(x @ P[l1.weight].t() + P[eng.states["h1"].bias], 0, 1)
    o = h @ P[l2.weight].t() + P[eng.states["out"].bias]
    t = torch.nn.functional.one_hot(y, 10).double()
    loss = (torch.nn.functional.cross_entropy(o, y) if cost == "ce"
            else 0.5 * ((o - t) ** 2).sum(1).mean())
    true = dict(zip(P, torch.autograd.grad(loss, list(P.values()))))
    tol = 1e-3 if nudge == "symmetric" else 1e-2     # one-sided is O(beta) biased
    for k in eng.learnable:
        err = float((ep[k] - true[k]).norm() / true[k].norm())
        assert err < tol, (k, err)


@pytest.mark.parametrize("name,graph,nudge", [
    ("mlp3_ce", lambda: zoo.mlp((64, 48, 32, 16, 10), cost="ce"), "symmetric"),
    ("conv_tap_ce", lambda: zoo.with_tap(zoo.convnet(channels=(8, 16), cost="ce"), "h1",
                                         pool=True), "symmetric"),
    ("teacher_mse", lambda: zoo.with_teacher(zoo.mlp((64, 48, 32, 10))), "one-sided"),
])
def test_ep_matches_the_implicit_gradient_with_heads(name, graph, nudge):
    g = with_readout(graph())
    assert any(s.readout for s in g.states)
    r = check_gradients(g, data="digits", beta=0.01, samples=32, nudge=nudge)
    assert r["unconverged"] == 0
    for c in r["couplings"] + r["biases"]:
        assert c["cosine"] >= 0.99, (name, c)
        assert 0.95 <= c["norm_ratio"] <= 1.05, (name, c)


def test_settle_pair_equals_the_two_phases_with_heads():
    eng = Engine(with_readout(zoo.with_tap(zoo.convnet(channels=(4, 6), cost="ce"), "h1",
                                           pool=True)), dtype=torch.float64)
    x = torch.rand((12, 1, 8, 8), dtype=torch.float64,
                   generator=torch.Generator().manual_seed(0))
    batch = eng.prepare(x)
    y = torch.arange(12) % 10
    free = eng.settle(batch, max_sweeps=60, tol=1e-10)
    kw = dict(labels=y, max_sweeps=500, tol=1e-9, routing=eng.routing(free.states, batch))
    p, m = (eng.settle(batch, free.states, beta=b, **kw) for b in (0.3, -0.3))
    p2, m2 = eng.settle_pair(batch, free.states, beta=0.3, **kw)
    assert (p2.sweeps, m2.sweeps) == (p.sweeps, m.sweeps)
    for a, b in ((p, p2), (m, m2)):
        assert max(float((a.states[j] - free.states[j]).abs().max())
                   for j in eng.settled) > 1e-4
        for j in eng.settled:
            torch.testing.assert_close(a.states[j], b.states[j], rtol=0, atol=1e-12)


def test_train_cli_with_heads_learns_and_neuromorphic_refuses(run_cli, examples, tmp_path):
    b = tmp_path / "m.epc"
    code, _, err = run_cli("compile", examples / "mlp_digits.onnx", "--target", "torch",
                           "--readout", "--cost", "ce", "-o", b, "-q")
    assert code == 0, err
    code, out, err = run_cli("train", b, "--data", "digits", "--epochs", "3", "--lr", "2e-3",
                             "--checkpoint", tmp_path / "ck", "--metrics-json",
                             tmp_path / "m.json")
    assert code == 0, err
    import json
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["test_accuracy"] > 0.85, m["test_accuracy"]
    code, out, err = run_cli("eval", tmp_path / "ck" / "last.epc", "--data", "digits")
    assert code == 0 and f"{100 * m['test_accuracy']:.2f}%" in out
    code, _, err = run_cli("compile", b, "--target", "neuromorphic", "-o", tmp_path / "x.nc")
    assert code == 2 and "readout head out" in err and "Traceback" not in err
    assert not (tmp_path / "x.nc").exists()
    # a compiled input cannot be given heads afterwards (structural option)
    code, _, err = run_cli("compile", b, "--readout", "-o", tmp_path / "y.epc")
    assert code == 2 and "--readout" in err
