"""Smoke tests of the accuracy and parity benchmarks (the full runs live in `python -m bench`)."""
import json

from bench.accuracy import main
from bench.parity import main as parity_main


def test_accuracy_bench_smoke(tmp_path):
    out = tmp_path / "acc.json"
    assert main(["--models", "mlp_digits", "--epochs", "3", "--seeds", "0", "1",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rec = res["models"]["mlp_digits"]
    assert res["epochs"] == 3 and rec["settings"] == "defaults"
    assert [r["seed"] for r in rec["runs"]] == [0, 1]
    accs = [r["test_accuracy"] for r in rec["runs"]]
    assert rec["test_accuracy"] == sum(accs) / 2 and rec["test_accuracy_min"] == min(accs)
    # three epochs of EP from the untrained example already separate digits (chance 0.1)
    assert 0.8 < rec["test_accuracy"] <= 1.0
    assert rec["target"] == 0.985 and rec["target_met"] == (rec["test_accuracy"] >= 0.985)


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
