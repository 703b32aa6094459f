"""runtime/memory.py: freed tensor memory kept for reuse stops a conv net's training steps
from page-faulting, and changes no bit of what they compute.

Each case runs in its own Python process: malloc's thresholds are process-wide and, once
fixed, cannot be put back to glibc's adaptive ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from epc.runtime import memory

from conftest import EXAMPLES

# Training steps of conv1_digits (one [64, 8, 8] state: 1 MiB at batch 64, 2 MiB for the
# nudged pair) at the bench's batch size, the case measured in runtime/memory.py.
# Prints the minor page faults per measured step and a digest of the weights after them.
STEPS = r"""
import hashlib, json, resource, sys, torch
from epc.runtime import memory
what = memory.retain_freed_memory() if sys.argv[1] == "retain" else "untouched"
torch.set_num_threads(1)
torch.manual_seed(0)
from epc.compiler.options import CompileOptions
from epc.api import compile_source
from epc.runtime.data import load_dataset
from epc.runtime.engine import Engine
from epc.runtime.learn import Optimizer, ep_gradient
eng = Engine(compile_source(sys.argv[2], CompileOptions()).graph, pool_freeze=None)
d = load_dataset("digits", input_shape=eng.input_shapes[eng.inputs[0]])
opt = Optimizer(eng.params, eng.learnable, lr=1e-3)
def step(i):
    x, y = d.train.x[64 * i:64 * (i + 1)], d.train.y[64 * i:64 * (i + 1)]
    batch = eng.prepare(x)
    f = eng.settle(batch, max_sweeps=20, tol=0.0)
    p, m = eng.settle_pair(batch, f.states, beta=0.2, labels=y, max_sweeps=10, tol=0.0)
    opt.step(ep_gradient(eng, batch, p.states, m.states, 0.2))
for i in range(3):
    step(i)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(3, 7):
    step(i)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 4
digest = hashlib.sha256(b"".join(eng.params[k].numpy().tobytes()
                                 for k in sorted(eng.learnable))).hexdigest()
print(json.dumps({"allocator": what, "faults_per_step": faults, "digest": digest}))
"""


def _env(**extra: str) -> dict:
    """This process's environment without the opt-out (a caller's would skew the cases)."""
    env = {k: v for k, v in os.environ.items() if k != memory.OPT_OUT}
    env.update(extra)
    return env


def _steps(mode: str) -> dict:
    model = str(EXAMPLES / "conv1_digits.onnx")
    p = subprocess.run([sys.executable, "-c", STEPS, mode, model], capture_output=True,
                       text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(memory._glibc() is None, reason="the thresholds are glibc's")
def test_retained_memory_stops_page_faults_and_keeps_the_bits():
    plain, kept = _steps("untouched"), _steps("retain")
    assert kept["allocator"].startswith("glibc malloc, mmap_threshold 32 MiB")
    # glibc's adaptive thresholds fault thousands of pages in per step here (2,800-6,900
    # measured); with them fixed, the heap hands the same pages back every sweep (0-200)
    assert plain["faults_per_step"] > 1000, plain
    assert kept["faults_per_step"] < plain["faults_per_step"] / 5, (plain, kept)
    assert kept["digest"] == plain["digest"]      # where tensors live, not what they hold


def test_opt_out_keeps_the_system_malloc():
    code = "from epc.runtime import memory; print(memory.retain_freed_memory())"
    for value, opted_out in (("1", True), ("0", False), ("", False)):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=_env(**{memory.OPT_OUT: value}), timeout=60)
        assert p.returncode == 0, p.stderr
        said = p.stdout.strip()
        assert (said == f"system malloc ({memory.OPT_OUT} is set)") == opted_out, said


def test_train_metrics_record_the_allocator(tmp_path, mlp_path):
    from epc.runtime.api import train
    m = train(mlp_path, epochs=1, threads=1, metrics_json=str(tmp_path / "m.json"))
    recorded = json.loads((tmp_path / "m.json").read_text())["allocator"]
    assert recorded == m["allocator"] == memory.retain_freed_memory()
    assert recorded.startswith(("glibc malloc", "system malloc"))
