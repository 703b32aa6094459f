"""Data-parallel training (runtime/distributed.py): N processes compute what one does.

Processes are real: `torchrun` for the CLI, and for the Python API inside a caller's
process group, tests/dist_worker.py started once per rank (gloo on this CPU). Each run is
compared with one process training the same bundle with the same global batch and seed.
The deferred stop decisions are also checked in one process, where reducing over the
processes is the identity and every result must be the same bits as without it.
"""
from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import epc
from epc.compiler.bundle import read_bundle
from epc.compiler.errors import EpcError
from epc.runtime.data import load_dataset
from epc.runtime.distributed import DEFAULT_TIMEOUT, DataParallel, Shard
from epc.runtime.engine import Engine
from epc.runtime.settle import SyncPlan
from epc.runtime.train import Trainer, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("dp")
    out = {}
    for name in ("mlp_digits", "mlp3_digits", "conv1_digits"):
        out[name] = str(d / f"{name}.epc")
        epc.compile(ROOT / "examples" / f"{name}.onnx", target="torch", output=out[name])
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("EPC_DEBUG",)}
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    return env


def _launch(tmp: Path, jobs: list, *, world: int = 2, timeout: float = 60,
            wait: float = 300, grace: float = 5) -> list:
    """Run the jobs in `world` worker processes; returns each rank's (exit status, stderr)
    (None for a rank still running `wait` seconds after the start, or `grace` seconds
    after rank 0 ended: then killed)."""
    spec = tmp / f"spec{time.monotonic_ns()}.json"
    spec.write_text(json.dumps({"out": str(tmp), "jobs": jobs, "timeout": timeout}))
    port = _port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(spec)], env=_env(r, world, port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    out = []
    for i, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=wait if i == 0 else grace)
            out.append((p.returncode, err))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            out.append((None, ""))
    return out


def _result(tmp: Path, job: str, rank: int) -> dict:
    return json.loads((tmp / f"{job}.rank{rank}.json").read_text())


def _weights(ckpt_dir) -> dict:
    return read_bundle(Path(ckpt_dir) / "last.epc").graph.weights


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# --------------------------------------------------------------------------- the CLI
def test_torchrun_two_processes_end_where_one_does(bundles, tmp_path):
    """`torchrun --nproc-per-node 2 -m epc train`: 3 epochs of the 3-hidden-layer MLP on
    digits end at the one-process weights (< 1e-4 apart) with the same test accuracy
    every epoch and the same sweeps; process 0 alone prints and writes. (A shard stopping
    its settles on its own samples would end 6e-3 away: the stops are the whole batch's.)"""
    # pinned to symmetric feedback and L2 decay (the defaults before bench.depth): under the
    # new defaults the two runs end further apart, measured 1.1e-2 (feedback gain 0.1: the
    # deep layers' EP differences sit near float32 rounding and are scaled up by 0.1^-k,
    # so the shards' summation order shows) and 4e-4 (gain 1, decoupled decay)
    model = str(tmp_path / "mlp3_g1.epc")
    epc.compile(ROOT / "examples" / "mlp3_digits.onnx", target="torch", output=model,
                feedback_gain=1)
    one = epc.train(model, epochs=3, checkpoint=tmp_path / "one", decoupled_wd=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "epc",
           "train", model, "--epochs", "3", "--checkpoint", str(tmp_path / "two"),
           "--metrics-json", str(tmp_path / "two.json"), "--l2-wd"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert [l.split(":")[0] for l in lines][:3] == ["epoch 1", "epoch 2", "epoch 3"]
    assert len(lines) == 5 and lines[3].startswith("trained 3 epochs")
    assert lines[4] == ("recipe: 3 hidden states, symmetric feedback (feedback gain 1), weight "
                        "decay 0.001 (L2), lr 0.0005 (the default); no warm start (auto: "
                        "symmetric feedback, where warm conversion was measured to fail)")
    # (printed once, by process 0)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-4
    for a, b in zip(one["history"], two["history"]):
        assert a["test_accuracy"] == b["test_accuracy"]
        assert a["mean_free_sweeps"] == b["mean_free_sweeps"]
        assert a["mean_nudged_sweeps"] == b["mean_nudged_sweeps"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["samples"] == b["samples"] == 1437 and a["steps"] == b["steps"] == 45
    # a checkpoint of two processes is resumed by two, and refused by one
    code, err = _cli_error(["train", model, "--epochs", "3", "--checkpoint",
                            str(tmp_path / "two"), "--resume", "--l2-wd"])
    assert code == 2 and "it was trained by 2 processes, this run has 1: resume it with 2 " \
                          "processes" in err


def _cli_error(args: list) -> tuple[int, str]:
    from epc.cli import main
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = main([str(a) for a in args])
    lines = [l for l in buf.getvalue().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("epc: error: "), buf.getvalue()
    return code, lines[0]


# --------------------------------------------------------------------------- the Python API
def test_api_in_a_process_group(bundles, tmp_path):
    """Two processes inside the caller's gloo group, one job after another:

    * the implicit gradient, augmentation, warm start stopped after one epoch and resumed
      by the same two processes, and a batch whose last step leaves process 1 without a
      sample (1437 = 4 x 359 + 1) each end where one process does; a sharded evaluation of
      such batches equals one process's;
    * refusals raised alike in every process, the group still usable after each: a
      one-process checkpoint resumed by two, a batch smaller than the world, processes
      started with different options, and bad input met by one process only;
    * then a process dies in the middle of a step, and the other stops at its next
      collective with a message saying so, not a hang."""
    m, c = bundles["mlp_digits"], bundles["conv1_digits"]
    epc.train(m, epochs=2, stop_after=1, checkpoint=tmp_path / "solo")
    go_on = {"stop_on_error": False}
    jobs = [
        {"name": "implicit", "model": m, "kwargs": {"epochs": 1, "gradient": "implicit",
                                                    "checkpoint": str(tmp_path / "imp")}},
        # L2 decay, as measured before decoupled decay became the default: with it the two
        # runs end 1.3e-5 apart (summation order over a slightly different trajectory)
        {"name": "augment", "model": c, "kwargs": {"epochs": 1, "augment": "crop:1,flip",
                                                   "decoupled_wd": False,
                                                   "checkpoint": str(tmp_path / "aug")}},
        {"name": "warm1", "model": m, "kwargs": {"epochs": 2, "warm_start": True,
                                                 "stop_after": 1,
                                                 "checkpoint": str(tmp_path / "warm")}},
        {"name": "warm2", "model": m, "kwargs": {"epochs": 2, "warm_start": True,
                                                 "resume": True,
                                                 "checkpoint": str(tmp_path / "warm"),
                                                 "metrics_json": str(tmp_path / "w.json")}},
        {"name": "empty", "model": m, "kwargs": {"epochs": 1, "batch_size": 359,
                                                 "checkpoint": str(tmp_path / "empty")}},
        {"name": "eval", "model": str(tmp_path / "empty" / "last.epc"), "command": "eval",
         "kwargs": {"split": "train", "batch_size": 359}},
        {"name": "solo", "model": m, "kwargs": {"epochs": 2, "resume": True,
                                                "checkpoint": str(tmp_path / "solo"),
                                                "metrics_json": str(tmp_path / "s.json")},
         **go_on},
        {"name": "small", "model": m, "kwargs": {"epochs": 1, "batch_size": 1}, **go_on},
        {"name": "differ", "model": m, "kwargs": {"epochs": 1},
         "rank_kwargs": {"1": {"lr": 1e-3}}, **go_on},
        {"name": "onlyone", "model": m, "kwargs": {"epochs": 1},
         "rank_kwargs": {"1": {"data": "mnist", "data_dir": str(tmp_path / "none")}}, **go_on},
        {"name": "die", "model": m, "die_at_step": 5, "kwargs": {"epochs": 1}},
    ]
    res = _launch(tmp_path, jobs)
    assert [r[0] for r in res] == [2, 3], [r[1][-2000:] for r in res]   # 1 died: os._exit(3)
    cases = [("implicit", "imp", m, {"epochs": 1, "gradient": "implicit"}),
             ("augment", "aug", c, {"epochs": 1, "augment": "crop:1,flip",
                                    "decoupled_wd": False}),
             ("warm2", "warm", m, {"epochs": 2, "warm_start": True}),
             ("empty", "empty", m, {"epochs": 1, "batch_size": 359})]
    for job, ck, model, kw in cases:
        one = epc.train(model, checkpoint=tmp_path / f"one_{ck}", **kw)
        assert _max_diff(_weights(tmp_path / f"one_{ck}"), _weights(tmp_path / ck)) < 1e-5, job
        for a in (_result(tmp_path, job, r) for r in (0, 1)):   # the whole run's figures
            assert a["processes"] == 2
            assert [h["test_accuracy"] for h in a["history"]] == \
                [h["test_accuracy"] for h in one["history"]], job
            assert [h["excluded_samples"] for h in a["history"]] == \
                [h["excluded_samples"] for h in one["history"]], job
            assert a["history"][-1]["train_loss"] == pytest.approx(
                one["history"][-1]["train_loss"], rel=1e-5)
    # the resumed run's metrics: written by process 0 once the run ended, both epochs
    w = json.loads((tmp_path / "w.json").read_text())
    assert w["epochs"] == 2 and not w["in_progress"] and len(w["history"]) == 2
    ev1 = epc.evaluate(tmp_path / "empty" / "last.epc", split="train", batch_size=359)
    for r in (0, 1):
        ev2 = _result(tmp_path, "eval", r)
        assert ev2["processes"] == 2 and ev2["samples"] == 1437
        for k in ("accuracy", "mean_sweeps", "unconverged_fraction", "dead_states",
                  "constant_prediction"):
            assert ev2[k] == ev1[k], k
        assert ev2["loss"] == pytest.approx(ev1["loss"], rel=1e-5)
    ck = tmp_path / "solo" / "last.epc"
    for job, text in (("solo", f"{ck}: incompatible checkpoint: it was trained by 1 process, "
                               f"this run has 2: resume it in one process (epc train without "
                               f"torchrun), or start a new run from its weights (epc train "
                               f"{ck}, without --resume)"),
                      ("small", "--batch-size 1 is smaller than the 2 processes of the run"),
                      ("differ", "process 1 of 2 does not run what process 0 runs"),
                      ("onlyone", f"in process 1 of 2: --data-dir {tmp_path / 'none'}: no "
                                  f"such directory")):
        for r in (0, 1):
            e = _result(tmp_path, job, r)
            assert e["every_process"] and e["error"].startswith(text), (job, e)
    assert not (tmp_path / "s.json").exists()
    lost = _result(tmp_path, "die", 0)
    assert lost["type"] == "ProcessLost" and not lost["every_process"]
    assert lost["error"].startswith("process 0 of 2: lost the other processes of the run "
                                    "during "), lost
    assert lost["wall_seconds"] < 30


def test_the_cli_says_an_error_once_for_all_processes(run_cli, bundles, monkeypatch):
    """Under torchrun every process runs the same command: an error raised alike in all
    (bad input) is printed by process 0 alone; one that befell a process alone (it lost
    the others) by that process, naming itself."""
    from epc import api
    from epc.runtime.distributed import ProcessLost
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, want in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        code, out, err = run_cli("train", bundles["mlp_digits"], "--dist-timeout", "-1")
        assert code == 2 and out == "" and len(err.splitlines()) == want, err

    def lost(*a, **k):
        raise ProcessLost("process 1 of 2: lost the other processes of the run during a "
                          "settle (Connection reset by peer); ...")
    monkeypatch.setattr(api, "train", lost)
    code, _, err = run_cli("train", bundles["mlp_digits"])
    assert code == 2 and err.startswith("epc: error: process 1 of 2: lost the other")


def test_sharded_evaluation_keeps_the_order_of_predictions(bundles):
    """evaluate(predictions=True) over processes: the predictions of every sample, in the
    split's order, as one process gives them (checked here with a stand-in group of one
    rank that splits the batch like process 0 of 3 and gathers what 3 would)."""
    from epc.runtime.train import evaluate
    eng = Engine(read_bundle(bundles["mlp_digits"]).graph)
    d = load_dataset("digits", input_shape=eng.input_shapes[eng.inputs[0]], num_classes=10)
    want = evaluate(eng, d.test.x, d.test.y, batch_size=100, predictions=True)
    got = _simulated_world_evaluate(eng, d.test.x, d.test.y, world=3, batch_size=100)
    assert np.array_equal(got["predictions"], want["predictions"])
    for k in ("accuracy", "mean_sweeps", "dead_states", "constant_prediction"):
        assert got[k] == want[k]


def _simulated_world_evaluate(eng, x, y, *, world: int, batch_size: int) -> dict:
    """Run the sharded evaluation for every rank of a `world` in threads of this process
    over a gloo group formed on a FileStore (real collectives, no subprocesses)."""
    import threading

    import torch.distributed as dist
    store = dist.HashStore()
    out, errs = {}, []

    def rank_main(r: int):
        try:
            pg = dist.ProcessGroupGloo(dist.PrefixStore("t", store), r, world)
            dp = _GroupDP(torch.device("cpu"), pg, r, world)
            e = Engine(eng.graph)
            from epc.runtime.train import evaluate
            out[r] = evaluate(e, x, y, batch_size=batch_size, predictions=True, dp=dp)
        except Exception as ex:     # noqa: BLE001 - reported below
            errs.append(ex)

    ts = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errs, errs
    for r in range(1, world):
        assert np.array_equal(out[r]["predictions"], out[0]["predictions"])
    return out[0]


class _GroupDP(DataParallel):
    """A DataParallel over an explicit gloo group object (threads of one process)."""

    def __init__(self, device, pg, rank, world):
        self.group, self.rank, self.world = pg, rank, world
        self.backend, self.device, self.comm = "gloo", device, torch.device("cpu")

    def _run(self, what, fn):
        return fn()


# --------------------------------------------------------------------------- failures
def test_a_hanging_process_stops_the_others_after_the_timeout(bundles, tmp_path):
    """Process 1 hangs in its third step: process 0 stops with ProcessLost once the group's
    timeout (6 s here) has passed in the collective it waits in, not after the run."""
    m = bundles["mlp_digits"]
    jobs = [{"name": "hang", "model": m, "hang_at_step": 3, "kwargs": {"epochs": 1}}]
    res = _launch(tmp_path, jobs, timeout=6, wait=90, grace=0.1)
    lost = _result(tmp_path, "hang", 0)
    assert res[0][0] == 2 and res[1][0] is None       # the hanging one was killed here
    assert lost["type"] == "ProcessLost" and "Timed out" in lost["error"], lost
    assert "during a settle" in lost["error"] or "during the step's" in lost["error"], lost
    assert 6 <= lost["wall_seconds"] < 40


# --------------------------------------------------------------------------- in one process
def test_deferred_stop_decisions_are_exact(bundles):
    """With a reduction that is the identity (one process), the deferred decisions take the
    same stops as deciding every sweep: training steps on the conv net (max-pool winners
    frozen mid-settle, the +-beta pair finishing apart) and the MLPs give the same bits,
    whatever the plan (here: the first decision at sweep 1, 8, or past the cap)."""
    for name in ("mlp3_digits", "conv1_digits", "mlp_digits"):
        g = read_bundle(bundles[name]).graph
        ref = _steps(g, None)
        for first in (1, 8, 10_000):
            got = _steps(g, first)
            assert got[1] == ref[1], (name, first)    # the sweeps of every phase
            for k in ref[0]:
                assert torch.equal(got[0][k], ref[0][k]), (name, first, k)


def _steps(g, first: int | None, steps: int = 6):
    eng = Engine(g)
    d = load_dataset("digits", input_shape=eng.input_shapes[eng.inputs[0]], num_classes=10)
    tr = Trainer(eng, d, TrainConfig(epochs=1, batch_size=64))
    if first is not None:
        eng.stop_sync = lambda t: t.clone()
        eng.deferred_stops().last_stops = _Always(first)
    sweeps = []
    for i in range(steps):
        idx = torch.arange(i * 64, (i + 1) * 64)
        r = tr.step(d.train.x[idx], d.train.y[idx], idx, 0)
        sweeps.append((r["free_sweeps"], r["nudged_sweeps"], r["unconverged"]))
    return {k: v.clone() for k, v in eng.params.items()}, sweeps


class _Always(dict):
    """A stop history that always says `first` (the plan starts there, or a little
    before where collectives are cheap)."""

    def __init__(self, first):
        super().__init__()
        self.first = first

    def get(self, key, default=None):
        return (self.first, self.first)


def test_shards_and_the_sync_plan():
    sh = [_shard(37, 4, r) for r in range(4)]
    assert [s.size for s in sh] == [10, 9, 9, 9] and sh[3].stop == 37
    assert [s.start for s in sh] == [0, 10, 19, 28]
    empty = _shard(1, 2, 1)
    t = torch.arange(5)
    assert empty.size == 0 and empty.rows(t).tolist() == [0]   # a copy, weighted 0
    def due(plan, upto=60):
        return [s for s in range(1, upto) if plan.due(s)]
    # collectives dearer than sweeps (2.5x): from the last end, gaps from 2 up to 8
    assert due(SyncPlan((20, 24), (1e-3, 2.5e-3))) == [24, 26, 30, 38, 46, 54]
    # cheaper: from 80% of the last first stop, every sweep, then 2, 4, 8
    assert due(SyncPlan((20, 24), (1e-3, 1e-4))) == [16, 17, 19, 23, 31, 39, 47, 55]
    # much dearer (a busy machine): gaps of 8 from the start
    assert due(SyncPlan((20, 24), (1e-4, 1e-2))) == [24, 32, 40, 48, 56]
    assert due(SyncPlan(None, None), 12) == [8, 9, 11]


def _shard(n, world, rank) -> Shard:
    dp = DataParallel.__new__(DataParallel)
    dp.rank, dp.world = rank, world
    return dp.shard(n)


def test_dist_timeout_is_checked_and_documented(cli):
    for bad in ("0", "-1", "inf", "nan", "1e7"):    # its rule (compiler/flags.py), one line
        r = cli("train", "x.epc", "--dist-timeout", bad)
        assert r.exit_code == 2 and r.stderr.strip().startswith(
            "epc: error: bad --dist-timeout ") and r.stderr.strip().endswith(
            "must be a number of seconds in (0, 1000000]"), r.stderr
    with pytest.raises(EpcError, match=r"^bad --dist-timeout 0: must be"):
        epc.train("x.epc", dist_timeout=0)
    assert DEFAULT_TIMEOUT == 300.0 == inspect.signature(epc.api.train).parameters[
        "dist_timeout"].default
    with pytest.raises(EpcError, match="runs in one process, and torchrun started 2"):
        os.environ["WORLD_SIZE"] = "2"
        try:
            epc.check_gradients("x.epc")
        finally:
            del os.environ["WORLD_SIZE"]
