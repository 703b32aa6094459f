"""Feedback regulation: couplings whose tied feedback drives the source at a gain below 1.

The regulated settling is the gradient flow of an energy in rescaled states, so the EP
estimate (corrected for the gains in runtime/learn.py) must match the implicit gradient of
the regulated dynamics, which must itself match backprop through a long unrolled settling
of the runtime's own loop."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import epc
from epc.compiler.errors import EpcError
from epc.compiler.options import CompileOptions
from epc.compiler.text import parse, print_graph
from epc.compiler.verify import problems
from epc.runtime import zoo
from epc.runtime.api import check_gradients
from epc.runtime.engine import Engine
from epc.runtime.gradcheck import implicit_gradient
from epc.runtime.learn import feedback_compensation

torch.set_num_threads(1)


def _mlp_module(depth: int, width: int = 16, d_in: int = 64) -> nn.Module:
    torch.manual_seed(0)
    layers, d = OrderedDict(), d_in
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(d, width)
        layers[f"relu{i}"] = nn.ReLU()
        d = width
    layers[f"fc{depth + 1}"] = nn.Linear(d, 10)
    return nn.Sequential(layers)


class _Skip(nn.Module):
    """x -> h1 -> h2 -> h3 with h3 = relu(fc3(h2) + h1): a skip over two couplings."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.out = (nn.Linear(8, 6), nn.Linear(6, 6),
                                                  nn.Linear(6, 6), nn.Linear(6, 3))

    def forward(self, x):
        h1 = torch.relu(self.fc1(x))
        h2 = torch.relu(self.fc2(h1))
        h3 = torch.relu(self.fc3(h2) + h1)
        return self.out(h3)


def _gained(g, r):
    for c in g.couplings:
        if c.feedback:
            c.feedback_gain = r
    return g


def test_compile_sets_gains_by_depth_and_round_trips():
    g = epc.compile(_mlp_module(3), example_input=torch.zeros(2, 64), feedback_gain=0.5)
    gains = {c.name: c.feedback_gain for c in g.couplings}
    assert gains == {"c_input__h1": 1.0, "c_h1__h2": 0.5, "c_h2__h3": 0.5, "c_h3__out": 0.5}
    text = print_graph(g)
    assert "feedback_gain=0.5" in text and print_graph(parse(text)) == text
    # a skip over two levels gets r^2, so the gains agree around the loop h1-h2-h3
    torch.manual_seed(0)
    s = epc.compile(_Skip(), example_input=torch.zeros(2, 8), feedback_gain=0.5)
    skip = [c for c in s.couplings if c.kind == "residual"]
    assert len(skip) == 1 and skip[0].feedback_gain == pytest.approx(0.25)
    a2 = Engine(s).feedback_scales()
    assert a2["out"] == 1.0 and a2["h3"] == pytest.approx(0.5) and a2["h1"] == pytest.approx(0.125)
    # gain 1 leaves the IR text as it was
    plain = epc.compile(_mlp_module(3), example_input=torch.zeros(2, 64), feedback_gain=1)
    assert "feedback_gain" not in print_graph(plain)


def test_auto_regulates_only_deep_chains():
    deep = epc.compile(_mlp_module(5), example_input=torch.zeros(2, 64), feedback_gain="auto")
    two = epc.compile(_mlp_module(2), example_input=torch.zeros(2, 64), feedback_gain="auto")
    shallow = epc.compile(_mlp_module(1), example_input=torch.zeros(2, 64),
                          feedback_gain="auto")
    assert {c.feedback_gain for c in deep.couplings if c.feedback} == {0.1}
    assert {c.feedback_gain for c in two.couplings if c.feedback} == {0.1}
    assert {c.feedback_gain for c in shallow.couplings} == {1.0}


def test_auto_is_the_default_and_keeps_one_hidden_layer_symmetric():
    """No flag: auto. One hidden layer compiles to the very graph gain 1 gives (the shallow
    examples keep their bits); deeper chains, conv graphs included, get the ratio."""
    from epc.compiler.text import print_graph as text
    x = torch.zeros(2, 64)
    assert CompileOptions().feedback_gain == "auto"
    assert text(epc.compile(_mlp_module(1), example_input=x)) == \
        text(epc.compile(_mlp_module(1), example_input=x, feedback_gain=1))
    deep = epc.compile(_mlp_module(3), example_input=x)
    assert {c.feedback_gain for c in deep.couplings if c.feedback} == {0.1}
    # convolutions between states: symmetric up to two hidden states (bench.depth's vgg2
    # learned better so), regulated from three on
    for n, want in ((2, {1.0}), (3, {0.1}), (4, {0.1})):
        torch.manual_seed(0)
        layers = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()]
        for _ in range(n - 1):
            layers += [nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()]
        conv = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
        g = epc.compile(conv, example_input=torch.zeros(2, 1, 8, 8))
        assert sum(s.role == "hidden" for s in g.states) == n
        assert {c.feedback_gain for c in g.couplings if c.feedback} == want, n


def test_neuromorphic_target_resolves_auto_to_symmetric_feedback(tmp_path):
    """The core applies tied feedback at gain 1: for it, auto (the default) is gain 1 at any
    depth, and an explicit other gain stays refused with one line."""
    m = _mlp_module(3)
    x = torch.zeros(2, 64)
    g = epc.compile(m, example_input=x, target="neuromorphic", output=str(tmp_path / "m.nc"))
    assert {c.feedback_gain for c in g.couplings} == {1.0}
    assert (tmp_path / "m.nc").stat().st_size > 0
    with pytest.raises(EpcError, match="--feedback-gain 1"):
        epc.compile(m, example_input=x, target="neuromorphic", feedback_gain=0.5,
                    output=str(tmp_path / "n.nc"))


def test_train_metrics_name_the_recipe(tmp_path):
    """The run's metrics (and the CLI's summary) say which depth recipe it trained with."""
    from epc.runtime.api import train
    x = torch.zeros(2, 64)
    m = train(epc.compile(_mlp_module(3), example_input=x), epochs=1, seed=0)
    r = m["recipe"]
    assert r["feedback_gain"] == pytest.approx(0.1) and r["regulated_couplings"] == 3
    assert r["hidden_states"] == 3 and r["weight_decay_form"] == "decoupled"
    m1 = train(epc.compile(_mlp_module(1), example_input=x), epochs=1, seed=0)
    assert m1["recipe"]["feedback_gain"] == 1.0 and m1["recipe"]["regulated_couplings"] == 0
    m2 = train(epc.compile(_mlp_module(1), example_input=x), epochs=1, seed=0,
               decoupled_wd=False)
    assert m2["recipe"]["weight_decay_form"] == "L2"


def test_readout_keeps_symmetric_feedback_under_auto_and_refuses_a_gain():
    """A readout takes the output coupling out of the energy, where the gains' rescaling is
    anchored: auto (the default) compiles it symmetric; an explicit gain is one error."""
    x = torch.zeros(2, 64)
    g = epc.compile(_mlp_module(3), example_input=x, readout=True, cost="ce")
    assert {c.feedback_gain for c in g.couplings} == {1.0}
    assert CompileOptions(readout=True, feedback_gain="1").check().feedback_gain == 1.0
    with pytest.raises(EpcError, match="--feedback-gain 0.5 with --readout"):
        CompileOptions(readout=True, feedback_gain=0.5).check()


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, math.nan, "fast", True])
def test_bad_gain_options_are_refused(bad):
    with pytest.raises(EpcError, match="feedback-gain"):
        CompileOptions(feedback_gain=bad).check()


def test_verifier_refuses_bad_gains():
    g = zoo.mlp((64, 16, 10))
    g.couplings[1].feedback_gain = -1.0
    assert any("feedback_gain must be a positive number" in e for e in problems(g))
    g = zoo.mlp((64, 16, 10))
    g.couplings[0].feedback_gain = 0.5     # the input coupling has no feedback
    assert any("without feedback" in e for e in problems(g))


def test_gains_that_disagree_around_a_loop_are_refused():
    torch.manual_seed(0)
    s = epc.compile(_Skip(), example_input=torch.zeros(2, 8), feedback_gain=0.5)
    next(c for c in s.couplings if c.kind == "residual").feedback_gain = 0.5   # not 0.25
    with pytest.raises(EpcError, match="disagree around a loop"):
        Engine(s).feedback_scales()


def test_regulated_settling_is_faster_and_its_ep_estimate_exact():
    """Five hidden layers: EP (corrected) matches the implicit gradient of the regulated
    net per coupling; the uncorrected estimate would be a_j^2 times it (the product of
    the gains above), and the free phase settles in far fewer sweeps than at gain 1."""
    g = _gained(zoo.mlp((64, 32, 32, 32, 32, 32, 10)), 0.3)
    r = check_gradients(g, data="digits", beta=0.01, samples=16)
    plain = check_gradients(zoo.mlp((64, 32, 32, 32, 32, 32, 10)), data="digits",
                            beta=0.01, samples=16)
    assert r["unconverged"] == 0 and not r["warnings"]
    for c in r["couplings"] + r["biases"]:
        assert c["cosine"] >= 0.999, c
        assert 0.98 <= c["norm_ratio"] <= 1.02, c
    assert r["sweeps"]["free"] < plain["sweeps"]["free"] / 2
    comp = feedback_compensation(Engine(g))
    assert comp["h1.w"] == pytest.approx(0.3 ** -5) and comp["out.w"] == pytest.approx(1.0)


def test_implicit_gradient_with_gains_matches_backprop_through_settling():
    """The reference under gains: the adjoint of the regulated sweep (autograd of Phi with
    the feedback terms scaled per colour block) equals autograd through the runtime's own
    unrolled settling, whose drives apply the gains directly."""
    g = _gained(zoo.mlp((64, 16, 16, 10)), 0.4)
    eng = Engine(g, dtype=torch.float64)
    x = torch.rand(8, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    batch = eng.prepare(x)
    free = eng.settle(batch, max_sweeps=2000, tol=1e-13)
    imp, info = implicit_gradient(eng, batch, free.states, y, tol=1e-12)
    assert info["converged"]
    names = eng.learnable
    saved = dict(eng.params)
    leaves = {k: eng.params[k].clone().requires_grad_(True) for k in names}
    eng.params.update(leaves)
    with torch.enable_grad():
        b2 = eng.prepare(x)
        r = eng.settle(b2, max_sweeps=200, tol=0.0)
        loss = eng.loss(r.states, b2, y).mean()
        grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    eng.params.update(saved)
    for k, gk in zip(names, grads):
        torch.testing.assert_close(imp[k], gk, rtol=1e-6, atol=1e-10)


def test_neuromorphic_target_refuses_gains(tmp_path):
    from epc.targets.neuromorphic.api import compile_program
    g = _gained(zoo.mlp((64, 16, 10)), 0.5)
    with pytest.raises(EpcError, match="--feedback-gain 1"):
        compile_program(g, tmp_path / "m.nc")


def test_decoupled_weight_decay_shrinks_instead_of_adding_l2():
    """With --decoupled-wd a weight with no gradient shrinks by lr*wd a step (AdamW); as an
    L2 term under Adam the same weight moves by about lr a step whatever wd is."""
    from epc.runtime.learn import Optimizer
    for decoupled, want in ((True, 1.0 * (1 - 0.1 * 0.01)), (False, 1.0 - 0.1)):
        params = {"w": torch.ones(3, dtype=torch.float64)}
        opt = Optimizer(params, ["w"], kind="adam", lr=0.1, weight_decay=0.01, cosine=False,
                        decoupled=decoupled)
        opt.step({"w": torch.zeros(3, dtype=torch.float64)})
        torch.testing.assert_close(params["w"], torch.full((3,), want, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-9)


def test_decoupled_weight_decay_is_a_resume_key(tmp_path):
    from epc.runtime.api import train
    g = zoo.mlp((64, 16, 10))
    m = train(g, epochs=2, checkpoint=str(tmp_path / "ck"), stop_after=1)
    assert m["config"]["decoupled_wd"] is True       # the default
    with pytest.raises(EpcError, match="decoupled_wd"):
        train(g, epochs=2, decoupled_wd=False, checkpoint=str(tmp_path / "ck"), resume=True)


def test_deviation_form_equals_the_plain_phases_in_float64():
    """Settled as deviations, the nudged phases and the EP estimate are the plain ones (to
    float64 rounding), with and without gains."""
    from epc.runtime import deviation
    from epc.runtime.learn import ep_gradient
    for r in (1.0, 0.3):
        g = _gained(zoo.mlp((64, 24, 16, 16, 10)), r)
        eng = Engine(g, dtype=torch.float64)
        x = torch.rand(12, 64, dtype=torch.float64)
        y = torch.randint(0, 10, (12,))
        batch = eng.prepare(x)
        free = eng.settle(batch, max_sweeps=3000, tol=1e-14)
        p, m = eng.settle_pair(batch, free.states, beta=0.1, labels=y, max_sweeps=3000,
                               tol=1e-14)
        dp, dm, _ = deviation.settle_pair(eng, batch, free.states, beta=0.1, labels=y,
                                          max_sweeps=3000, rtol=1e-13)
        for j in eng.settled:
            torch.testing.assert_close(dp[j], p.states[j], rtol=0, atol=1e-11)
            torch.testing.assert_close(dm[j], m.states[j], rtol=0, atol=1e-11)
        want = ep_gradient(eng, batch, p.states, m.states, 0.1)
        got = deviation.ep_gradient(eng, batch, dp, dm, 0.1)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-7, atol=1e-9)


def test_deviation_form_keeps_the_deep_nudge_in_float32():
    """Eight hidden layers at gain 0.1: the first coupling's estimate from float32 phases
    settled as states is rounding noise; settled as deviations it is the float64 one."""
    from epc.runtime import deviation
    from epc.runtime.gradcheck import _compare
    from epc.runtime.learn import ep_gradient
    torch.manual_seed(0)
    g = _gained(zoo.mlp((64,) + (32,) * 8 + (10,)), 0.1)
    x = torch.rand(16, 64)
    y = torch.randint(0, 10, (16,))
    e64 = Engine(g, dtype=torch.float64)
    b64 = e64.prepare(x.double())
    f64 = e64.settle(b64, max_sweeps=3000, tol=1e-13)
    p, m = e64.settle_pair(b64, f64.states, beta=0.2, labels=y, max_sweeps=3000, tol=1e-13)
    ref = ep_gradient(e64, b64, p.states, m.states, 0.2)["h1.w"]
    e32 = Engine(g)
    b32 = e32.prepare(x)
    f32 = e32.settle(b32, max_sweeps=100, tol=1e-4)
    p, m = e32.settle_pair(b32, f32.states, beta=0.2, labels=y, max_sweeps=40, tol=1e-4)
    plain = ep_gradient(e32, b32, p.states, m.states, 0.2)["h1.w"]
    dp, dm, _ = deviation.settle_pair(e32, b32, f32.states, beta=0.2, labels=y, max_sweeps=40)
    dev = deviation.ep_gradient(e32, b32, dp, dm, 0.2)["h1.w"]
    assert _compare(dev, ref)["cosine"] >= 0.99
    assert _compare(plain, ref)["cosine"] < 0.5


def test_deviation_form_refuses_what_it_does_not_settle():
    from epc.runtime.api import train
    with pytest.raises(EpcError, match="nudge-form deviation.*conv"):
        train(zoo.convnet(channels=(4, 4)), epochs=1, nudge_form="deviation")
    with pytest.raises(EpcError, match="needs --nudge symmetric"):
        train(zoo.mlp((64, 16, 10)), epochs=1, nudge_form="deviation", nudge="one-sided")
    g = _gained(zoo.mlp((64, 64, 64, 64, 10)), 0.1)
    m = train(g, epochs=3, lr=3e-3, nudge_form="deviation")
    plain = train(g, epochs=3, lr=3e-3)
    assert m["config"]["nudge_form"] == "deviation"
    assert m["test_accuracy"] > 0.85 and abs(m["test_accuracy"] - plain["test_accuracy"]) < 0.03
