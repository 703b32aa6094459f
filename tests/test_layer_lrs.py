"""Per-layer learning rates (`epc train --layer-lrs none|auto|F1,...,FL`).

The rates are factors on --lr per depth level of the compiled graph (runtime/layer_lrs.py):
the levels come from the graph, `auto` is a function of the graph alone, a wrong number of
factors is one error line, and the factors reach the optimiser: each weight moves at its
own level's rate."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import epc
from epc.compiler import flags
from epc.compiler.errors import EpcError
from epc.runtime import layer_lrs
from epc.runtime.data import load_dataset
from epc.runtime.engine import Engine
from epc.runtime.learn import Optimizer
from epc.runtime.train import Trainer, TrainConfig

torch.set_num_threads(1)


def _mlp(hidden: int, seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    layers, d = OrderedDict(), 64
    for i in range(1, hidden + 1):
        layers[f"fc{i}"] = nn.Linear(d, width)
        layers[f"relu{i}"] = nn.ReLU()
        d = width
    layers[f"fc{hidden + 1}"] = nn.Linear(d, 10)
    return nn.Sequential(layers).eval()


def _graph(hidden: int, seed: int = 0, **opts):
    return epc.compile(_mlp(hidden, seed), example_input=torch.zeros(2, 64), **opts)


class _Skip(nn.Module):
    """h3 = relu(fc3(h2) + h1): a skip coupling joins the level of the state it drives."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3, self.out = (nn.Linear(64, 8), nn.Linear(8, 8),
                                                  nn.Linear(8, 8), nn.Linear(8, 10))

    def forward(self, x):
        h1 = torch.relu(self.fc1(x))
        h2 = torch.relu(self.fc2(h1))
        return self.out(torch.relu(self.fc3(h2) + h1))


def test_levels_follow_depth():
    g = _graph(3)
    lv = layer_lrs.levels(g)
    assert layer_lrs.depth(g) == 4
    by_coupling = {c.dst: sorted({lv[w] for op in c.ops
                                  for w in epc.compiler.ir.op_weights(op).values()})
                   for c in g.couplings}
    assert by_coupling == {"h1": [1], "h2": [2], "h3": [3], "out": [4]}
    assert {lv[s.bias] for s in g.states if s.bias} == {1, 2, 3, 4}
    # a skip coupling (h1 -> h3) is on the level of h3, the state it drives
    gs = epc.compile(_Skip().eval(), example_input=torch.zeros(2, 64))
    lvs = layer_lrs.levels(gs)
    skip = [c for c in gs.couplings if c.src == "h1" and c.dst != "h2"]
    assert skip, [(c.src, c.dst) for c in gs.couplings]
    for c in skip:
        for op in c.ops:
            for w in epc.compiler.ir.op_weights(op).values():
                assert lvs[w] == layer_lrs.levels(gs)[w] == 3


def test_factors_none_explicit_and_auto_from_the_graph_alone():
    g = _graph(3)
    names = list(g.weight_names())
    by, per = layer_lrs.factors(g, "none", names)
    assert per == (1.0,) * 4 and set(by.values()) == {1.0}
    by, per = layer_lrs.factors(g, "1,0.5,0.25,0.125", names)
    lv = layer_lrs.levels(g)
    assert per == (1.0, 0.5, 0.25, 0.125)
    assert all(by[w] == per[lv[w] - 1] for w in names)
    # auto is deterministic from the graph: the same structure under other weights (seed)
    # gets the same factors, and it is the stated rule of the depth
    a = layer_lrs.factors(_graph(3, seed=0), "auto", names)[1]
    b = layer_lrs.factors(_graph(3, seed=7), "auto", names)[1]
    assert a == b == layer_lrs.auto_factors(g) and len(a) == 4
    assert all(x > 0 for x in a)


def test_auto_scales_wide_fan_ins_down():
    """auto: a dense level whose units sum more than AUTO_FAN_IN inputs gets
    sqrt(that / fan-in), the others 1 (fan-in of dense: the weight's in-size; of conv:
    in-channels x kernel)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    g = epc.compile(m, example_input=torch.zeros(2, 1024))
    assert layer_lrs.fan_ins(g) == {1: 1024, 2: 16}
    assert layer_lrs.auto_factors(g) == pytest.approx((math.sqrt(256 / 1024), 1.0))
    torch.manual_seed(0)
    c = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(64, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 8 * 8, 10)).eval()
    gc = epc.compile(c, example_input=torch.zeros(2, 1, 8, 8))
    assert layer_lrs.fan_ins(gc) == {1: 9, 2: 576, 3: 512}
    # convolutions keep the rate (measured: scaled, a 6-conv VGG underfits); the dense head
    # is scaled by its fan-in
    assert layer_lrs.auto_factors(gc) == pytest.approx((1.0, 1.0, math.sqrt(256 / 512)))


def test_wrong_count_is_one_error_naming_the_levels():
    g = _graph(3)
    with pytest.raises(EpcError, match=r"bad --layer-lrs 1.0,0.5: 2 factors for a graph of "
                                       r"4 levels of couplings \(1: h1, 2: h2, 3: h3, "
                                       r"4: out\): give 4"):
        layer_lrs.factors(g, "1,0.5", list(g.weight_names()))


@pytest.mark.parametrize("bad", ["0,1", "1,-1", "1,x", "", "1,,2", "nan,1", "inf", [True]])
def test_bad_values_refused_by_the_flag_rule(bad):
    with pytest.raises(EpcError, match="bad --layer-lrs"):
        flags.check("layer_lrs", bad)


def test_values_normalise_to_one_text():
    assert flags.check("layer_lrs", "1, 0.5") == flags.check("layer_lrs", (1, 0.5)) == \
        "1.0,0.5"
    assert flags.check("layer_lrs", "auto") == "auto"


def _digits(eng):
    return load_dataset("digits", input_shape=eng.input_shapes[eng.inputs[0]],
                        num_classes=eng.num_classes)


def test_rates_reach_the_optimiser():
    """Each weight's rate is --lr times its level's factor, and a first Adam step (no
    decay, no schedule) moves each weight with a gradient by about its own rate."""
    g = _graph(2)
    eng = Engine(g)
    cfg = TrainConfig(epochs=1, lr=1e-2, weight_decay=0.0, cosine=False,
                      layer_lrs="1,0.1,0.01")
    tr = Trainer(eng, _digits(eng), cfg)
    lv = layer_lrs.levels(g)
    want = {1: 1e-2, 2: 1e-3, 3: 1e-4}
    for w in eng.learnable:
        assert tr.opt.lr_of(w) == pytest.approx(want[lv[w]], rel=1e-12)
    before = {w: eng.params[w].clone() for w in eng.learnable}
    grads = {w: torch.ones_like(eng.params[w]) for w in eng.learnable}
    tr.opt.step(grads)
    for w in eng.learnable:
        moved = (before[w] - eng.params[w]).abs()
        # Adam's first step is lr * g / (|g| + eps) = lr (to eps)
        assert torch.allclose(moved, torch.full_like(moved, want[lv[w]]), rtol=1e-4), w


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_factors_equal_a_scaled_rate(kind):
    """A factor f on every weight updates as a run at lr * f (decoupled decay too)."""
    def run(lr, scales):
        torch.manual_seed(0)
        P = {"w": torch.randn(5, 4), "b": torch.randn(5)}
        opt = Optimizer(P, ["w", "b"], kind=kind, lr=lr, weight_decay=0.1, decoupled=True,
                        cosine=True, total_steps=6, lr_scales=scales)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            opt.step({k: torch.randn(v.shape, generator=g) for k, v in P.items()})
        return P
    a = run(1e-2, {"w": 0.5, "b": 0.5})
    b = run(5e-3, None)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7), k
    c = run(1e-2, {"w": 0.5})          # b keeps the rate: it moves as in the plain run
    d = run(1e-2, None)
    assert torch.allclose(c["b"], d["b"], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(c["w"], d["w"])


def test_factors_of_one_are_the_plain_run():
    """Where auto keeps every level at --lr (fan-ins up to 256, the digits MLPs) a run is
    the same bits as one rate."""
    g = _graph(2)
    assert set(layer_lrs.auto_factors(g)) == {1.0}
    a = epc.train(g, epochs=1, batch_size=64, layer_lrs="auto")
    b = epc.train(g, epochs=1, batch_size=64, layer_lrs="none")
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    assert a["test_accuracy"] == b["test_accuracy"]


def test_unknown_weight_factor_refused():
    with pytest.raises(EpcError, match="not optimised"):
        Optimizer({"w": torch.zeros(2)}, ["w"], lr_scales={"v": 2.0})


def test_recipe_metrics_and_resume(tmp_path):
    g = _graph(1)
    ck = tmp_path / "ck"
    m = epc.train(g, epochs=2, batch_size=64, layer_lrs="1,0.25", checkpoint=str(ck),
                  stop_after=1)
    assert m["config"]["layer_lrs"] == "1.0,0.25"
    assert m["recipe"]["layer_lrs"] == "1.0,0.25"
    assert m["recipe"]["layer_learning_rates"] == pytest.approx([5e-4, 1.25e-4])
    # a resumed run must ask for the same rates
    with pytest.raises(EpcError, match="layer_lrs='1.0,0.25'"):
        epc.train(g, epochs=2, batch_size=64, layer_lrs="none", checkpoint=str(ck),
                  resume=True)
    a = epc.train(g, epochs=1, batch_size=64, layer_lrs="auto")
    assert a["recipe"]["layer_lrs"] == "auto"
    assert a["recipe"]["layer_learning_rates"] == pytest.approx(
        [5e-4 * f for f in layer_lrs.auto_factors(g)])


def test_cli_error_line_and_recipe_line(tmp_path):
    g = _graph(1)
    path = tmp_path / "m.epc"
    epc.compile(g, target="torch", output=str(path))
    cmd = [sys.executable, "-m", "epc", "train", str(path), "--epochs", "1", "-q"]
    r = subprocess.run(cmd + ["--layer-lrs", "1,2,3"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "epc: error: bad --layer-lrs 1.0,2.0,3.0: 3 factors for a graph of 2 levels of "
        "couplings (1: h1, 2: out): give 2"]
    r = subprocess.run(cmd + ["--layer-lrs", "2,0.5", "--metrics-json",
                              str(tmp_path / "m.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ", layer learning rates 0.001/0.00025 (--layer-lrs 2.0,0.5);" in \
        r.stdout.strip().splitlines()[-1]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["recipe"]["layer_learning_rates"] == pytest.approx([1e-3, 2.5e-4])
    # auto on a graph whose levels all keep --lr (fan-ins 64 and 16): nothing to add
    r = subprocess.run(cmd + ["--layer-lrs", "auto"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("recipe: ") and "learning rate" not in last
