"""bench/depth.py: the depth ladder runs EP and backprop side by side from the same initial
weights, records each run's config and recipe, and renders its JSON as a table.

A short cut of the ladder (two MLP rungs, two epochs on 600 training digits): `--quick` itself (mlp1, mlp5, vgg2,
3 epochs) takes a few minutes on two cores and is not run here."""
from __future__ import annotations

import json

import pytest
import torch

from bench import depth

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ladder():
    # 600 training digits, two epochs: ~40 steps, enough to leave chance far behind
    return depth.run_ladder(["mlp1", "mlp3"], data="digits", epochs=2, seeds=[0],
                            bp_lrs=[2e-3],
                            toggle_names=["feedback_gain", "taps", "decoupled_wd",
                                          "layer_lrs"],
                            train_samples=600, log=lambda m: None)


def test_every_rung_has_ep_variants_and_backprop(ladder):
    assert list(ladder["nets"]) == ["mlp1", "mlp3"]
    for name, row in ladder["nets"].items():
        ep = row["ep"]
        assert list(ep)[0] == "defaults" and len(ep) == 5
        bp = row["backprop"]
        # both learn well above chance (10%)
        assert ep["defaults"]["test_accuracy"] > 0.3, name
        assert bp["test_accuracy"] > 0.5, name
        assert row["ep_minus_backprop"] == pytest.approx(
            ep["defaults"]["test_accuracy"] - bp["test_accuracy"])
        for v in ep.values():
            run = v["runs"][0]
            assert run["config"]["epochs"] == 2 and run["recipe"]["hidden_states"] == \
                row["hidden_states"]
            assert 0.0 <= v["at_cap"] <= v["at_cap_max"] <= 1.0
            assert v["free_sweeps"] >= 1 and v["seconds_per_epoch"] > 0


def test_toggles_change_what_they_name(ladder):
    mlp1, mlp3 = ladder["nets"]["mlp1"]["ep"], ladder["nets"]["mlp3"]["ep"]
    defaults = ladder["defaults"]
    gain_toggle = next(k for k in mlp3 if k.startswith("feedback_gain="))
    wd_toggle = next(k for k in mlp3 if k.startswith("decoupled_wd="))
    # the gain toggle is the other side of what auto picked for the graph: one hidden layer
    # compiles symmetric and is tried at 0.1, three compile regulated and are tried at 1
    assert next(k for k in mlp1 if k.startswith("feedback_gain=")) == "feedback_gain=0.1"
    assert gain_toggle == "feedback_gain=1"
    for row, default_regulated, toggled_regulated in ((mlp1, 0, 1), (mlp3, 3, 0)):
        toggle = next(k for k in row if k.startswith("feedback_gain="))
        assert row["defaults"]["runs"][0]["compiled"]["regulated_couplings"] == default_regulated
        assert row[toggle]["runs"][0]["compiled"]["regulated_couplings"] == toggled_regulated
        assert row[toggle]["runs"][0]["recipe"]["regulated_couplings"] == toggled_regulated
        assert row[toggle].get("same_as") is None
    # taps on one hidden layer add nothing to tap: the same graph, the defaults' run reused
    assert mlp1["taps=auto"]["same_as"] == "defaults"
    assert mlp3["taps=auto"].get("same_as") is None
    forms = {mlp3["defaults"]["runs"][0]["recipe"]["weight_decay_form"],
             mlp3[wd_toggle]["runs"][0]["recipe"]["weight_decay_form"]}
    assert forms == {"L2", "decoupled"}
    assert mlp3[wd_toggle]["runs"][0]["config"]["decoupled_wd"] == (not defaults["decoupled_wd"])
    # the per-layer rates toggle: the other side of the default, recorded with its rates
    lr_toggle = next(k for k in mlp3 if k.startswith("layer_lrs="))
    assert lr_toggle == "layer_lrs=" + ("auto" if defaults["layer_lrs"] == "none" else "none")
    rec = mlp3[lr_toggle]["runs"][0]["recipe"]
    assert rec["layer_lrs"] == lr_toggle.split("=")[1] and len(rec["layer_learning_rates"]) == 4


def test_markdown_renders_every_run(ladder, tmp_path, capsys):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ladder))
    assert depth.main(["--markdown", str(p)]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| mlp") or ln.startswith("|  |")]
    assert len(rows) == 10
    assert "(= defaults)" in out and "feedback_gain=0.1" in out and "EP - BP" in out


def test_quick_subset_is_stated():
    assert depth.QUICK["nets"] and depth.QUICK["epochs"] <= 3
    assert set(depth.QUICK["nets"]) <= set(depth.LADDER)
