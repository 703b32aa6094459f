"""Warm start inside `epc train` (issue 21): `--backprop-epochs N|auto` runs N epochs of
backprop on the graph's feedforward form (runtime/backprop.py, the machinery of `epc
backprop`) before the EP epochs; the run reports the free phase before anything
(`initial`), backprop's accuracy and the converted network before any EP step
(`converted`), lowers the EP learning rate unless --lr is given, prints its recipe, and
resumes across the backprop/EP boundary. `auto` warm-starts the graphs where cold EP is
measured to fail (skips between states, deep conv stacks) and no other."""
from __future__ import annotations

import json

import numpy as np
import pytest

import epc
from bench import depth as D
from epc.compiler.bundle import read_bundle
from epc.compiler.errors import EpcError
from epc.runtime import zoo
from epc.runtime.warm import AUTO_BACKPROP_EPOCHS, resolve_epochs
from epc.targets.torch import emit
from conftest import one_error_line


_line = one_error_line


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = tmp_path_factory.mktemp("warm2") / "mlp.epc"
    emit(zoo.mlp((64, 24, 10), max_sweeps=40, nudge_sweeps=12), p, None)
    return p


def _weights(path) -> dict:
    return {k: np.asarray(v) for k, v in read_bundle(path).graph.weights.items()
            if isinstance(v, np.ndarray)}


def test_backprop_epochs_are_epc_backprop_and_the_converted_net_is_reported(model, tmp_path):
    """The backprop epochs train exactly what `epc backprop` trains (same weights, bit for
    bit, from the same seed and lr), and the converted accuracy is that command's figure."""
    bp = epc.backprop(model, epochs=2, lr=2e-3, seed=0, output=tmp_path / "bp.epc")
    m = epc.train(model, epochs=0, backprop_epochs=2, seed=0, checkpoint=tmp_path / "ck")
    w = m["warm_start"]
    assert w["epochs"] == 2 and len(w["history"]) == 2 and w["lr"] == 2e-3
    assert w["test_accuracy"] == bp["test_accuracy"]
    assert m["converted"]["test_accuracy"] == bp["converted"]["test_accuracy"]
    # the weights moved: before anything the free phase is near chance, after it is not
    assert m["initial"]["test_accuracy"] < 0.3 < m["converted"]["test_accuracy"]
    trained, fresh = _weights(tmp_path / "ck" / "last.epc"), _weights(model)
    for k, v in _weights(tmp_path / "bp.epc").items():
        assert np.array_equal(trained[k], v), k
    assert any(not np.array_equal(trained[k], fresh[k]) for k in fresh)


def test_warm_start_lowers_the_ep_lr_unless_lr_is_given(model):
    warm = epc.train(model, epochs=1, backprop_epochs=1)
    assert warm["config"]["lr"] == pytest.approx(1e-4)
    assert warm["recipe"]["lr_rule"].startswith("after a warm start")
    given = epc.train(model, epochs=1, backprop_epochs=1, lr=3e-4)
    assert given["config"]["lr"] == 3e-4 and given["recipe"]["lr_rule"] == "given"
    cold = epc.train(model, epochs=1)        # auto: a 1-hidden MLP trains cold
    assert cold["config"]["lr"] == 5e-4 and cold["config"]["backprop_epochs"] == 0
    assert "warm_start" not in cold and "converted" not in cold
    # the EP epochs follow on the backprop epochs' history, in order
    assert [h["epoch"] for h in warm["warm_start"]["history"]] == [1]
    assert [h["epoch"] for h in warm["history"]] == [1]
    # the divergence watch measures a warm run against the net before its backprop epochs
    assert warm["history"][0]["cold_loss"] == warm["initial"]["test_loss"]
    assert "cold_loss" not in cold["history"][0]


def test_cli_prints_the_three_figures_and_the_recipe(model, run_cli, tmp_path):
    code, out, err = run_cli("train", model, "--epochs", "1", "--backprop-epochs", "2",
                             "--metrics-json", tmp_path / "m.json")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("backprop epoch 1:") and lines[1].startswith("backprop epoch 2:")
    assert lines[2].startswith("epoch 1:")
    m = json.loads((tmp_path / "m.json").read_text())
    assert lines[3].startswith("trained 1 EP epochs")
    assert (f"before anything {100 * m['initial']['test_accuracy']:.2f}%; after 2 backprop "
            f"epochs {100 * m['warm_start']['test_accuracy']:.2f}%, converted to EP before "
            f"any EP step {100 * m['converted']['test_accuracy']:.2f}%") in lines[3]
    assert lines[4].endswith("lr 0.0001 (after a warm start: 0.0005 x 0.2); warm start: 2 "
                             "backprop epochs (lr 0.002) before EP (given)"), lines[4]
    code, out, _ = run_cli("train", model, "--epochs", "1")
    assert out.splitlines()[-1].endswith(
        "lr 0.0005 (the default); no warm start (auto: symmetric feedback, where warm "
        "conversion was measured to fail)")


@pytest.mark.parametrize("value", ["-1", "x", "2.5", "1000001"])
def test_bad_backprop_epochs_is_one_line(model, run_cli, value):
    msg = _line(*run_cli("train", model, "--backprop-epochs", value)[::2])
    assert msg == f"bad --backprop-epochs '{value}': must be an integer in [0, 1000000] or auto"


def test_bad_backprop_lr_is_one_line(model, run_cli):
    assert _line(*run_cli("train", model, "--backprop-lr", "0")[::2]) == \
        "bad --backprop-lr 0.0: must be a finite number > 0"
    with pytest.raises(EpcError, match="bad --backprop-epochs -2"):
        epc.train(model, backprop_epochs=-2)


def test_resume_across_the_backprop_ep_boundary(model, tmp_path, run_cli):
    """A run stopped after its backprop epochs and first EP epoch resumes to the very
    bits of the run that was not stopped; resuming with another warm start is refused."""
    full = epc.train(model, epochs=3, backprop_epochs=2, checkpoint=tmp_path / "a")
    epc.train(model, epochs=3, backprop_epochs=2, checkpoint=tmp_path / "b", stop_after=1)
    resumed = epc.train(model, epochs=3, backprop_epochs=2, checkpoint=tmp_path / "b",
                        resume=True)
    def timeless(records):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]
    assert timeless(resumed["history"]) == timeless(full["history"])
    assert timeless(resumed["warm_start"]["history"]) == timeless(full["warm_start"]["history"])
    assert timeless([resumed["converted"]]) == timeless([full["converted"]])
    a, b = _weights(tmp_path / "a" / "last.epc"), _weights(tmp_path / "b" / "last.epc")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    msg = _line(*run_cli("train", model, "--epochs", "3", "--checkpoint", tmp_path / "b",
                         "--resume", "--backprop-epochs", "0")[::2])
    assert msg.endswith("incompatible checkpoint: it was trained after 2 backprop epochs (a "
                        "warm start), this run asks for 0: resume with --backprop-epochs 2")


def test_auto_warm_starts_where_cold_ep_fails():
    """auto: the Hopfield-ResNet layout and the skip ResNet (skips between states) and the
    6-conv VGG are warm-started, shallower conv nets and MLPs of any depth are not, nor
    any graph compiled with symmetric feedback (where the conversion fails)."""
    for name, want in (("mlp1", 0), ("mlp8", 0), ("vgg4", 0), ("vgg6", AUTO_BACKPROP_EPOCHS),
                       ("res2", AUTO_BACKPROP_EPOCHS), ("hop13w8", AUTO_BACKPROP_EPOCHS)):
        n, why = resolve_epochs("auto", D.compile_net(name, "digits", 0))
        assert n == want, (name, why)
        assert why.startswith("auto: ")
    n, why = resolve_epochs("auto", D.compile_net("hop13w8", "digits", 0, feedback_gain=1))
    assert (n, why) == (0, "auto: symmetric feedback, where warm conversion was measured "
                           "to fail")
    assert resolve_epochs("auto", D.compile_net("mlp3", "digits", 0)) == \
        (0, "auto: cold EP trains this graph")
    assert resolve_epochs("auto", D.compile_net("res2", "digits", 0))[1].endswith(
        "skip couplings between states")
    assert resolve_epochs(7, D.compile_net("mlp1", "digits", 0)) == (7, "given")


def test_programs_take_no_backprop_epochs(model, run_cli, tmp_path):
    prog = tmp_path / "mlp.nc"
    assert run_cli("compile", model, "--target", "neuromorphic", "-o", prog, "-q")[0] == 0
    assert _line(*run_cli("train", prog, "--backprop-epochs", "3")[::2]) == \
        f"{prog}: --backprop-epochs applies to float bundles, not to neuromorphic programs"
    code, _, err = run_cli("train", prog, "--epochs", "0", "--backprop-epochs", "0")
    assert code == 0, err


def test_auto_does_not_warm_start_trained_weights_again(model, tmp_path):
    """A bundle `epc backprop` wrote, or a checkpoint of `epc train`, is not trained by
    backprop a second time under auto (`epc backprop` then `epc train` stays a recipe)."""
    epc.backprop(model, epochs=1, output=tmp_path / "bp.epc")
    m = epc.train(tmp_path / "bp.epc", epochs=1, checkpoint=tmp_path / "ck")
    assert "warm_start" not in m and m["config"]["backprop_epochs"] == 0
    assert m["recipe"]["warm_start_rule"] == ("auto: the bundle's weights are "
                                              "backprop-trained already (epc backprop)")
    assert m["config"]["lr"] == 5e-4         # the cold default: no warm start in this run
    g = D.compile_net("hop13w8", "digits", 0)
    assert resolve_epochs("auto", g, {"trained": {"epochs": 3}}) == \
        (0, "auto: the bundle's weights are trained already (epc train)")


def test_depth_bench_warm_toggle_is_the_other_side_of_auto():
    """bench.depth's `warm` toggle: cold EP where auto warm-starts, a warm start where it
    does not; the warm rows carry backprop's and the converted accuracy, and the table
    shows them."""
    assert D.warm_toggle(D.compile_net("hop13w8", "digits", 0)) == \
        ("warm=0", {"backprop_epochs": 0})
    res = D.run_ladder(["mlp1"], epochs=1, bp_lrs=[2e-3], toggle_names=["warm"],
                       train_samples=300, log=lambda m: None)
    row = res["nets"]["mlp1"]["ep"]
    assert list(row) == ["defaults", f"warm={AUTO_BACKPROP_EPOCHS}"]
    assert "converted" not in row["defaults"]
    warm = row[f"warm={AUTO_BACKPROP_EPOCHS}"]
    assert warm["backprop_epochs"] == AUTO_BACKPROP_EPOCHS
    assert warm["runs"][0]["config"]["backprop_epochs"] == AUTO_BACKPROP_EPOCHS
    # 30 backprop epochs on 300 digits: well past the cold free phase after one EP epoch
    assert warm["converted"] > 0.5 and warm["backprop_test_accuracy"] > 0.5
    assert f"after {AUTO_BACKPROP_EPOCHS} backprop epochs: BP " in D.markdown(res)
