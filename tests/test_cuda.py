"""The GPU path (`--device cuda`).

This machine has no GPU, so the path is checked two ways. Here, on the CPU: `--device
cuda` where there is none is one error line, and every tensor the runtime creates names
its device (or is listed below with the reason it lives on the CPU). On a machine with
CUDA (bench/gpu.py runs this file there): the settle loop, training, resume, the
implicit gradient, augmentation, warm start and data parallelism over nccl give on the GPU
what they give on the CPU, to float tolerance. Those tests skip without CUDA.
"""
from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import epc
from epc.compiler.bundle import read_bundle
from epc.runtime.data import load_dataset
from epc.runtime.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


# --------------------------------------------------------------------------- on any machine
@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "eval", "check-gradients"])
def test_device_cuda_without_cuda_is_one_line(run_cli, mlp_path, tmp_path, command):
    code, out, err = run_cli(command, mlp_path, "--device", "cuda", "--metrics-json",
                             tmp_path / "m.json")
    assert code == 2 and out == ""
    assert err == "epc: error: --device cuda: CUDA is not available on this machine\n"
    assert not (tmp_path / "m.json").exists()


def test_devices_the_runtime_does_not_run_on(run_cli, mlp_path):
    for dev, msg in (("meta", "bad --device 'meta': must be cpu, cuda, cuda:N or mps"),
                     ("gpu", "bad --device 'gpu': must be cpu, cuda, cuda:N or mps")):
        code, _, err = run_cli("train", mlp_path, "--device", dev)
        assert code == 2 and err == f"epc: error: {msg}\n"


# Tensor factories that take a device; `*_like` and methods of a tensor (new_zeros, ...)
# follow their tensor's.
FACTORIES = {"zeros", "ones", "full", "empty", "arange", "tensor", "randperm", "rand", "randn",
             "randint", "eye", "linspace", "as_tensor", "from_numpy"}
# The runtime's files that run on the engine's device (the integer simulator, the data
# readers and the neuromorphic programs run on the CPU by design).
DEVICE_FILES = ["runtime/engine.py", "runtime/settle.py", "runtime/learn.py",
                "runtime/gradcheck.py", "runtime/kernels.py", "runtime/train.py",
                "runtime/api.py", "runtime/augment.py", "runtime/distributed.py",
                "runtime/backprop.py",
                "compiler/ops.py", "targets/torch.py"]
# (file, function): why a tensor made there without a device is right on the CPU
ON_CPU = {
    ("runtime/train.py", "_epoch_perm"): "indices into the training set, which is on the CPU",
    ("runtime/train.py", "Trainer.__init__"): "warm-start buffers: the whole training set's "
                                              "states, kept on the CPU, rows moved per step",
    ("runtime/train.py", "Trainer.restore"): "copied into the device's tensors (copy_)",
    ("runtime/train.py", "_evaluate_sharded"): "counts and class flags, reduced on the "
                                               "group's own device",
    ("runtime/api.py", "check_gradients"): "which training samples: indices into CPU data",
    ("runtime/augment.py", "Augment.__call__"): "draws from a CPU generator, moved to the "
                                                "batch's device",
    ("runtime/learn.py", "Optimizer.__init__"): "an empty buffer when nothing is learned",
    ("runtime/learn.py", "Optimizer.load_state_arrays"): "copied into the device's tensors",
    ("runtime/api.py", "check_batch_memory"): "an empty tensor asked for its element size",
    ("runtime/api.py", "_check_train_memory"): "an empty tensor asked for its element size",
    ("runtime/backprop.py", "train_feedforward"): "the epoch's shuffle from a CPU "
                                                  "generator, moved to the engine's device",
    ("runtime/backprop.py", "FeedForward.__init__"): "the module exported to ONNX, on the CPU",
    ("runtime/backprop.py", "onnx_bytes"): "the export's example input, on the CPU",
    ("compiler/ops.py", "MaxPoolRule.frozen_context"): "the integer simulator's (CPU) contexts",
    ("compiler/ops.py", "AvgPoolRule.core_adjoint"): "the integer simulator's (CPU) adjoint",
}


def _factory_calls(path: Path):
    """(enclosing function, line) of every torch.<factory>(...) call without device=."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            name = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{where}.{child.name}" if where and not where.endswith(">") else \
                    child.name
            elif isinstance(child, ast.ClassDef):
                name = child.name
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) \
                    and isinstance(child.func.value, ast.Name) \
                    and child.func.value.id == "torch" and child.func.attr in FACTORIES \
                    and not any(k.arg == "device" for k in child.keywords):
                out.append((where, child.lineno))
            visit(child, name)
    visit(tree, "")
    return out


def test_every_tensor_the_runtime_makes_names_its_device():
    """On a GPU, a tensor made on the CPU by mistake fails (or silently copies every
    sweep). Every factory call in the runtime's device code passes device=, or sits in a
    function listed in ON_CPU with its reason."""
    bad, seen = [], set()
    for f in DEVICE_FILES:
        p = ROOT / f
        if not p.exists():
            continue
        for where, line in _factory_calls(p):
            # methods nest as Class.method, a nested helper as outer.helper: any prefix
            parts = where.split(".")
            keys = {(f, ".".join(parts[:k])) for k in range(1, len(parts) + 1)}
            hit = keys & set(ON_CPU)
            if hit:
                seen |= hit
            else:
                bad.append(f"{f}:{line} in {where or 'module'}")
    assert not bad, "tensors made without a device: " + ", ".join(bad)
    assert seen == set(ON_CPU), f"stale ON_CPU entries: {set(ON_CPU) - seen}"


# --------------------------------------------------------------------------- on a GPU
@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("cuda")
    out = {}
    for name in ("mlp_digits", "mlp3_digits", "conv_digits", "conv1_digits"):
        out[name] = str(d / f"{name}.epc")
        epc.compile(ROOT / "examples" / f"{name}.onnx", target="torch", output=out[name])
    return out


@needs_cuda
@pytest.mark.parametrize("name", ["mlp3_digits", "conv_digits"])
def test_settling_on_cuda_is_settling_on_the_cpu(nets, name):
    """The free and nudged fixed points of a batch, on the GPU and on the CPU (float32
    both, TF32 off): equal to well within the settling tolerance, in as many sweeps."""
    g = read_bundle(nets[name]).graph
    got = {}
    for dev in ("cpu", "cuda"):
        epc.runtime.api._device(dev)     # what the runtime sets for a device (TF32 off)
        eng = Engine(g, device=dev)
        d = load_dataset("digits", input_shape=eng.input_shapes[eng.inputs[0]], num_classes=10)
        batch = eng.prepare(d.train.x[:64])
        y = d.train.y[:64].to(eng.device)
        free = eng.settle(batch)
        rt = free.routing or eng.routing(free.states, batch)
        plus, minus = eng.settle_pair(batch, free.states, beta=0.2, labels=y, routing=rt)
        got[dev] = ({j: v.cpu() for j, v in free.states.items()},
                    {j: v.cpu() for j, v in plus.states.items()}, free.sweeps, plus.sweeps)
    for a, b in zip(got["cpu"][:2], got["cuda"][:2]):
        for j in a:
            assert torch.allclose(a[j], b[j], atol=2e-5), (name, j)
    assert abs(got["cpu"][2] - got["cuda"][2]) <= 1 and abs(got["cpu"][3] - got["cuda"][3]) <= 1


@needs_cuda
def test_training_on_cuda_matches_the_cpu(nets, tmp_path):
    """3 epochs of mlp_digits: the same accuracy to a sample or two, every tensor of the
    run on the GPU (the checkpoint is written from it), and an exact resume there."""
    m = nets["mlp_digits"]
    cpu = epc.train(m, epochs=3)
    gpu = epc.train(m, epochs=3, device="cuda", checkpoint=tmp_path / "c")
    assert gpu["device"].startswith("cuda")
    assert abs(gpu["test_accuracy"] - cpu["test_accuracy"]) <= 2 / 360
    assert gpu["history"][-1]["train_loss"] == pytest.approx(cpu["history"][-1]["train_loss"],
                                                             rel=1e-3)
    epc.train(m, epochs=3, device="cuda", checkpoint=tmp_path / "r", stop_after=2)
    again = epc.train(m, epochs=3, device="cuda", checkpoint=tmp_path / "r", resume=True)
    assert again["history"][-1]["train_loss"] == gpu["history"][-1]["train_loss"]
    a, b = (read_bundle(tmp_path / k / "last.epc").graph.weights for k in ("c", "r"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


@needs_cuda
@pytest.mark.parametrize("kw", [{"gradient": "implicit"}, {"augment": "crop:1,flip"},
                                {"warm_start": True}, {"nudge": "one-sided"}])
def test_options_train_on_cuda(nets, kw):
    net = nets["conv1_digits" if "augment" in kw else "mlp_digits"]
    cpu = epc.train(net, epochs=1, **kw)
    gpu = epc.train(net, epochs=1, device="cuda", **kw)
    assert abs(gpu["test_accuracy"] - cpu["test_accuracy"]) <= 3 / 360, kw
    assert gpu["excluded_samples"] == cpu["excluded_samples"]


@needs_cuda
@pytest.mark.parametrize("name", ["mlp3_digits", "conv_digits", "conv1_digits"])
def test_each_digits_net_learns_on_cuda(nets, name):
    m = epc.train(nets[name], epochs=2, device="cuda", lr=3e-4 if "conv" in name else 5e-4)
    assert m["test_accuracy"] > 0.5 and m["device"].startswith("cuda")


@needs_cuda
def test_eval_and_check_gradients_on_cuda(nets, tmp_path):
    epc.train(nets["conv_digits"], epochs=1, device="cuda", checkpoint=tmp_path / "c")
    a = epc.evaluate(tmp_path / "c" / "last.epc")
    b = epc.evaluate(tmp_path / "c" / "last.epc", device="cuda")
    assert abs(a["accuracy"] - b["accuracy"]) <= 1 / 360
    r = epc.check_gradients(nets["mlp_digits"], device="cuda", samples=16)
    assert r["min_cosine"] > 0.99


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_over_nccl_end_where_one_does(nets, tmp_path):
    """torchrun 2 processes, one GPU each (cuda:LOCAL_RANK), nccl: the one-process weights."""
    m = nets["mlp3_digits"]
    epc.train(m, epochs=2, device="cuda", checkpoint=tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "epc",
           "train", m, "--epochs", "2", "--device", "cuda", "--checkpoint",
           str(tmp_path / "two"), "--metrics-json", str(tmp_path / "two.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
    a, b = (read_bundle(tmp_path / k / "last.epc").graph.weights for k in ("one", "two"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-4
