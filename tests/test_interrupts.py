"""Ctrl-C, for real: SIGINT sent to `python -m epc` (the console script's entry, epc/__main__.py)
at several moments, from the start-up imports to the middle of a checkpointed run. Each
must end with exit status 130 and one line on stderr, and leave the last checkpoint whole
(and no temporary beside it)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epc.compiler.bundle import read_bundle
from epc.runtime import zoo
from epc.targets.torch import emit

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(),
                                reason="watches /proc/PID/maps for the start-up imports")


def _started_importing(pid: int) -> bool:
    """Whether the process has mapped numpy's extension: epc's own imports are running
    (the interpreter's start-up, which is Python's and not epc's, is over)."""
    try:
        return "_multiarray_umath" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _run(args, *, when, cwd):
    """Start `python -m epc ARGS`, send SIGINT when `when(proc)` says so; returns the
    process (finished)."""
    p = subprocess.Popen([sys.executable, "-m", "epc", *map(str, args)], cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.when = when
    return p


def test_ctrl_c_at_any_moment(tmp_path, examples):
    model = tmp_path / "mlp.epc"
    emit(zoo.mlp((64, 12, 10), max_sweeps=20, nudge_sweeps=8), model, None)
    t0 = {}

    def at_import(p):           # as soon as epc's imports are under way
        return _started_importing(p.pid)

    def after(seconds):
        def when(p):
            if _started_importing(p.pid):
                t0.setdefault(p.pid, time.monotonic())
            return p.pid in t0 and time.monotonic() - t0[p.pid] >= seconds
        return when

    def after_checkpoint(ck, extra):
        def when(p):
            if (ck / "last.epc").exists():
                t0.setdefault(p.pid, time.monotonic())
            return p.pid in t0 and time.monotonic() - t0[p.pid] >= extra
        return when

    runs = []
    for i, when in enumerate([at_import, after(0.3), after(1.5)]):
        ck = tmp_path / f"ck{i}"
        runs.append((ck, _run(["train", model, "--epochs", "5000", "--checkpoint", ck, "-q"],
                              when=when, cwd=tmp_path)))
    for i, extra in enumerate([0.0, 0.17]):
        ck = tmp_path / f"ckw{i}"
        runs.append((ck, _run(["train", model, "--epochs", "5000", "--checkpoint", ck, "-q"],
                              when=after_checkpoint(ck, extra), cwd=tmp_path)))
    runs.append((None, _run(["compile", examples / "resnet13.onnx", "-o", tmp_path / "r.epc"],
                            when=after(0.8), cwd=tmp_path)))
    pending = {id(p): p for _, p in runs}
    deadline = time.monotonic() + 240
    while pending and time.monotonic() < deadline:
        for key, p in list(pending.items()):
            if p.poll() is not None:
                del pending[key]           # ended before its moment: reported below
            elif p.when(p):
                p.send_signal(signal.SIGINT)
                del pending[key]
        time.sleep(0.005)
    for p in pending.values():
        p.kill()
    for ck, p in runs:
        out, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 130 and len(lines) == 1, (p.args, p.returncode, err[-2000:])
        assert lines[0].startswith("epc: interrupted"), lines
        if ck is not None and (ck / "last.epc").exists():
            b = read_bundle(ck / "last.epc")            # whole, and a training state
            assert b.docs["train_state"]["epoch"] >= 1
            assert "continue with --resume" in lines[0]
            assert [f.name for f in ck.iterdir()] == ["last.epc"], list(ck.iterdir())
    # an interrupted run continues from its checkpoint
    import epc
    ck = next(ck for ck, _ in runs if ck is not None and (ck / "last.epc").exists())
    done = read_bundle(ck / "last.epc").docs["train_state"]["epoch"]
    epc.train(model, epochs=5000, checkpoint=ck, resume=True, stop_after=1)
    assert read_bundle(ck / "last.epc").docs["train_state"]["epoch"] == done + 1
