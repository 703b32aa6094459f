"""16-bit settling on this CPU: epoch time at --precision fp32, bf16, fp16, side by side.

    python -m bench.precision [--reps 3] [--nets NAME ...] [--accuracy] [--json precision.json]

One training epoch (the trainer's own clock, which stops before the test evaluation) of
each digits net (and, where the files are, the Fashion-MNIST MLP 784-256-10) at each
precision, alternately `--reps` times from the same initial weights in this process; the
ratios fp32 time / 16-bit time are medians over the alternations (above 1: 16-bit is
faster). fp16 has no native arithmetic on x86 CPUs (torch converts every element), so
only the MLPs and the one-conv net run it here. `--accuracy` adds 30 epochs of each digits
net at bf16 and fp16, seed 0, beside float32 (the README's accuracy runs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import write_json

ROOT = Path(__file__).resolve().parent.parent
NETS = {"mlp_digits": ("fp32", "bf16", "fp16"), "mlp3_digits": ("fp32", "bf16", "fp16"),
        "conv1_digits": ("fp32", "bf16", "fp16"), "conv_digits": ("fp32", "bf16")}


def _graph(name: str):
    import epc
    return epc.compile(ROOT / "examples" / f"{name}.onnx")


def _epoch_seconds(g, data, precision: str, lr: float, batch: int = 32) -> tuple[float, dict]:
    from epc.runtime.engine import Engine
    from epc.runtime.train import Trainer, TrainConfig
    tr = Trainer(Engine(g, precision=precision), data,
                 TrainConfig(epochs=1, lr=lr, batch_size=batch, precision=precision))
    h = tr.run().history[0]
    return h["seconds"], h


def bench_precision(reps: int = 3, fashion_dir: str | None = None,
                    names: list[str] | None = None, log=print) -> dict:
    from epc.runtime.data import FASHION_MNIST_DIR, load_dataset
    torch.set_num_threads(1)
    out = {"load_before": list(os.getloadavg()), "reps": reps, "nets": {}}
    nets = {n: (_graph(n), ps) for n, ps in NETS.items() if names is None or n in names}
    fdir = fashion_dir or FASHION_MNIST_DIR
    if Path(fdir).is_dir() and (names is None or "fashion_mlp_784_256_10" in names):
        sys.path.insert(0, str(ROOT))
        from bench.scaling import fashion_mlp
        import tempfile
        from epc.compiler.bundle import read_bundle
        p = fashion_mlp((784, 256, 10), Path(tempfile.mkdtemp()) / "f.epc")
        nets["fashion_mlp_784_256_10"] = (read_bundle(p).graph, ("fp32", "bf16"))
    for name, (g, precisions) in nets.items():
        data = (load_dataset("fashion-mnist", data_dir=fdir, input_shape=(784,),
                             num_classes=10) if name.startswith("fashion") else
                load_dataset("digits", input_shape=tuple(g.inputs[0].shape), num_classes=10))
        lr = 3e-4 if name.startswith("conv") else 5e-4
        secs = {p: [] for p in precisions}
        hist = {}
        for _ in range(reps):
            for p in precisions:
                s, hist[p] = _epoch_seconds(g, data, p, lr)
                secs[p].append(s)
            log(f"{name}: " + ", ".join(f"{p} {secs[p][-1]:.2f}s" for p in precisions))
        out["nets"][name] = {
            "epoch_seconds": secs,
            "speedup": {p: float(np.median([a / b for a, b in zip(secs["fp32"], secs[p])]))
                        for p in precisions if p != "fp32"},
            "first_epoch": {p: {k: hist[p][k] for k in ("test_accuracy", "train_loss",
                                                         "mean_free_sweeps",
                                                         "mean_nudged_sweeps")}
                            for p in precisions}}
    out["load_after"] = list(os.getloadavg())
    return out


def accuracy_30(log=print) -> dict:
    """30 epochs, seed 0, the defaults (as the same-bits baselines ran): test accuracy at
    fp32, bf16 and fp16."""
    import epc
    out = {}
    for name in ("mlp_digits", "mlp3_digits", "conv1_digits"):
        b = Path(__import__("tempfile").mkdtemp()) / f"{name}.epc"
        epc.compile(ROOT / "examples" / f"{name}.onnx", target="torch", output=b)
        out[name] = {}
        for p in ("fp32", "bf16", "fp16"):
            m = epc.train(b, epochs=30, seed=0, precision=p)
            out[name][p] = {"test_accuracy": m["test_accuracy"],
                            "final_train_loss": m["history"][-1]["train_loss"],
                            "mean_free_sweeps": m["history"][-1]["mean_free_sweeps"],
                            "seconds": m["seconds"]}
            log(f"{name} {p}: {m['test_accuracy']:.4f}")
        out[name]["bf16_minus_fp32_points"] = 100 * (out[name]["bf16"]["test_accuracy"]
                                                     - out[name]["fp32"]["test_accuracy"])
        out[name]["fp16_minus_fp32_points"] = 100 * (out[name]["fp16"]["test_accuracy"]
                                                     - out[name]["fp32"]["test_accuracy"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fashion-dir", default=None)
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--nets", nargs="+", default=None,
                    help=f"which nets (default: all: {', '.join(NETS)}, "
                         f"fashion_mlp_784_256_10)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from epc.runtime.memory import retain_freed_memory
    retain_freed_memory()
    t0 = time.perf_counter()
    res = {"timing": bench_precision(a.reps, a.fashion_dir, a.nets)}
    if a.accuracy:
        res["accuracy_30_epochs"] = accuracy_30()
    res["seconds"] = time.perf_counter() - t0
    if a.json:
        write_json(a.json, res)
    print(json.dumps({k: v["speedup"] for k, v in res["timing"]["nets"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
