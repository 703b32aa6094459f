"""One rule per option (compiler/flags.py), whichever command takes it; what a run does
with odd but valid values (zero epochs of on-chip learning); and the divergence watch."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from epc.compiler import flags
from epc.compiler.errors import EpcError
from epc.runtime import zoo
from epc.runtime.train import accuracy_collapse, divergence
from epc.targets.torch import emit
from conftest import one_error_line


_line = one_error_line


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = tmp_path_factory.mktemp("opt") / "mlp.epc"
    emit(zoo.mlp((64, 12, 10), max_sweeps=20, nudge_sweeps=8), p, None)
    return p


USES = {"--max-sweeps": ("train", "eval", "check-gradients"),
        "--tol": ("train", "eval", "check-gradients"), "--seed": ("train", "check-gradients"),
        "--threads": ("train", "eval", "check-gradients"),
        "--device": ("train", "eval", "check-gradients"), "--batch-size": ("train", "eval", "run")}


@pytest.mark.parametrize("flag,value,rule", [
    ("--max-sweeps", "0", "an integer in [1, 1000000]"),
    ("--max-sweeps", "-1", "an integer in [1, 1000000]"),
    ("--tol", "nan", "a finite number >= 0"),
    ("--tol", "-0.5", "a finite number >= 0"),
    ("--seed", str(2 ** 63), "an integer in [0, 4294967295]"),
    ("--seed", "-1", "an integer in [0, 4294967295]"),
    ("--threads", str(2 ** 31), "an integer in [1, 1024]"),
    ("--threads", "0", "an integer in [1, 1024]"),
    ("--device", "meta", "cpu, cuda, cuda:N or mps"),
    ("--batch-size", "0", "an integer in [1, 16777216]"),
])
def test_every_command_refuses_a_value_by_the_same_rule(run_cli, model, flag, value, rule):
    """eval and check-gradients used to take --max-sweeps 0/-1 and --tol nan/-1 that train
    refused (check-gradients then printed min cosine 0.00000); --seed 2^63, --threads 2^31
    and --device meta were internal errors."""
    lines = {_line(*run_cli(cmd, model, flag, value)[::2]) for cmd in USES[flag]}
    shown = repr(value) if flag == "--device" else value
    assert lines == {f"bad {flag} {shown}: must be {rule}"}, lines


def test_the_api_takes_the_same_rules(model):
    import epc
    for call in (lambda: epc.evaluate(model, max_sweeps=0),
                 lambda: epc.check_gradients(model, tol=float("nan")),
                 lambda: epc.train(model, seed=2 ** 63),
                 lambda: epc.train(model, threads=2 ** 31),
                 lambda: epc.evaluate(model, device="meta"),
                 lambda: epc.run(model, limit=0),
                 lambda: epc.compile(model, max_sweeps=-1),
                 lambda: epc.inspect(model, memory_limit="lots")):
        with pytest.raises(EpcError, match=r"^bad --[a-z-]+ "):
            call()
    # the runtime's own entry points apply the same rules
    from epc.runtime.api import check_gradients, evaluate
    with pytest.raises(EpcError, match=r"^bad --max-sweeps -1: must be"):
        evaluate(str(model), max_sweeps=-1)
    with pytest.raises(EpcError, match=r"^bad --tol -1: must be"):
        check_gradients(str(model), tol=-1)


def test_rules_accept_what_they_promise():
    assert flags.check("schedule", "color") == "colour"
    assert flags.check("seed", 2 ** 32 - 1) == 2 ** 32 - 1
    assert flags.check("tol", 0) == 0.0 and flags.check("max_sweeps", None) is None
    for name, bad in (("lr", math.inf), ("momentum", 1.0), ("beta", 0.0), ("epochs", True),
                      ("gradient", "bptt"), ("clip", -1.0), ("lr_shift", 49)):
        with pytest.raises(EpcError, match=f"^bad {flags.flag(name)} "):
            flags.check(name, bad)


def test_zero_epochs_of_on_chip_learning(run_cli, model, tmp_path):
    prog = tmp_path / "mlp.nc"
    assert run_cli("compile", model, "--target", "neuromorphic", "-o", prog, "-q")[0] == 0
    code, out, err = run_cli("train", prog, "--epochs", "0", "-o", tmp_path / "same.nc",
                             "--metrics-json", tmp_path / "m.json")
    assert code == 0, err
    assert out.startswith("trained 0 epochs on chip") and "train acc n/a" in out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["epochs"] == 0 and m["history"] == [] and 0 <= m["test_accuracy"] <= 1
    assert (tmp_path / "same.nc").read_bytes() == prog.read_bytes()


def test_non_finite_cost_weights_are_refused(run_cli, tmp_path):
    from epc.compiler.text import print_graph
    text = print_graph(zoo.mlp((6, 5, 3)), weights="inline")
    assert "weight=1.0" in text
    for bad in ("nan", "inf", "-1.0"):
        p = tmp_path / "g.epir"
        p.write_text(text.replace("weight=1.0", f"weight={bad}"))
        line = _line(*run_cli("inspect", p)[::2])
        assert line.startswith(f"{p}:") and "'weight' must be a finite number >= 0" in line


def test_data_that_does_not_pair_up_is_refused(tmp_path):
    from epc.runtime.data import load_dataset

    def idx(arr):
        return bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big")
                                                     for n in arr.shape) + arr.tobytes()
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": idx(rng.integers(0, 256, (5, 28, 28), np.uint8)),
             "train-labels-idx1-ubyte": idx(rng.integers(0, 10, 6, np.uint8)),   # one more
             "t10k-images-idx3-ubyte": idx(rng.integers(0, 256, (3, 28, 28), np.uint8)),
             "t10k-labels-idx1-ubyte": idx(rng.integers(0, 10, 3, np.uint8))}
    for n, b in files.items():
        (tmp_path / n).write_bytes(b)
    with pytest.raises(EpcError, match="do not match"):
        load_dataset("mnist", data_dir=tmp_path)
    files["train-images-idx3-ubyte"] = idx(np.zeros((0, 28, 28), np.uint8))
    files["train-labels-idx1-ubyte"] = idx(np.zeros(0, np.uint8))
    for n, b in files.items():
        (tmp_path / n).write_bytes(b)
    with pytest.raises(EpcError, match="do not match|empty"):   # no training sample
        load_dataset("mnist", data_dir=tmp_path)
    # an idx header whose dims overflow int64 when multiplied
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + b"\xff\xff\xff\xff" * 3 + b"\0" * 10)
    with pytest.raises(EpcError, match="does not match its header"):
        load_dataset("mnist", data_dir=tmp_path)


# --------------------------------------------------------------------------- divergence watch
def _rec(epoch, loss, acc, first=None):
    r = {"epoch": epoch, "train_loss": loss, "test_loss": loss, "train_accuracy": acc,
         "test_accuracy": acc, "seconds": 1.0}
    if first is not None:
        r["initial_loss"] = first
    return r


def test_the_watch_rules():
    ok = [_rec(1, 0.3, 0.8, first=0.5), _rec(2, 0.2, 0.9), _rec(3, 0.1, 0.95)]
    assert divergence(ok, chance=0.1) is None
    assert "over 10x the loss of its first batch" in divergence(
        ok + [_rec(4, 5.5, 0.9)], 0.1)
    assert "is nan" in divergence(ok + [_rec(4, math.nan, 0.9)], 0.1)
    fell = ok + [_rec(4, 0.4, 0.12)]
    assert "fell to 12.00%, chance level (10.00%" in divergence(fell, 0.1)
    assert "after 95.00% in epoch 3" in accuracy_collapse(fell, 0.1)
    # never healthy (best 30% with 10 classes), or not down at chance: no verdict
    assert accuracy_collapse([_rec(1, 1, 0.3), _rec(2, 1, 0.1)], 0.1) is None
    assert accuracy_collapse([_rec(1, 1, 0.9), _rec(2, 1, 0.2)], 0.1) is None
    # a loss that only wobbles, or improves past its first batch, is fine
    assert divergence([_rec(1, 0.6, 0.5, first=0.5), _rec(2, 0.9, 0.6)], 0.1) is None
    # after a warm start the first batch is already trained: the start is the network
    # before its backprop epochs (HR13 seed 1 at lr 5e-4 was stopped at 0.04 > 10 x 0.004)
    warm = [dict(_rec(1, 0.004, 0.97, first=0.004), cold_loss=0.5), _rec(2, 0.04, 0.95)]
    assert divergence(warm, 0.1) is None
    assert "over 10x the loss of the network before its warm start (0.5)" in divergence(
        warm + [_rec(3, 5.5, 0.9)], 0.1)


def test_an_exploding_run_stops_naming_its_epoch(run_cli, model, tmp_path):
    """`--lr 1e3` used to run all its epochs at loss 1.7e10 and exit 0."""
    ck, mj = tmp_path / "ck", tmp_path / "m.json"
    code, out, err = run_cli("train", model, "--epochs", "5", "--lr", "1e3", "--checkpoint",
                             ck, "--metrics-json", mj)
    line = _line(code, err)
    assert line.startswith("training diverged in epoch 1: ") and "--divergence warn" in line
    m = json.loads(mj.read_text())
    assert m["diverged"] == line and m["in_progress"] is False
    assert m["history"][-1]["epoch"] == 1
    assert not (ck / "last.epc").exists()      # the diverged epoch is not kept
    code, out, err = run_cli("train", model, "--epochs", "2", "--lr", "1e3", "--divergence",
                             "warn", "--metrics-json", mj)
    assert code == 0, err
    warned = [l for l in err.splitlines() if l.startswith("epc: warning: training diverged")]
    assert [w.split(":")[2].strip() for w in warned][:1] == ["training diverged in epoch 1"]
    m = json.loads(mj.read_text())
    assert m["divergence"] == "warn" and len(m["divergence_warnings"]) >= 1
    # a sane run warns about nothing
    code, out, err = run_cli("train", model, "--epochs", "2", "--metrics-json", mj)
    assert code == 0 and "diverged" not in err
    assert json.loads(mj.read_text())["divergence_warnings"] == []
