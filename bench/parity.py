"""Neuromorphic parity and on-chip learning on digits (the neuromorphic issue's targets).

For each example digits network (the MLP and both conv nets): train it with float EP
exactly as `bench.accuracy` does (same settings, seed and thread count), then quantize the
trained graph to 8-bit programs (scales from the weights, and calibrated on digits) and to
4-bit programs calibrated on digits (one exponent per coupling, and per output channel),
and run the test set through the bit-exact simulator. Reported per program: accuracy, the
gap to the float runtime in points, prediction agreement with the float runtime, max /
median sweeps to the integer fixed point, unsettled and cycling samples and overflows.
Then on-chip learning: the untrained MLP compiled to an 8-bit program and trained in the
simulator (integer only) for 20 epochs, compared with the float EP run.

    python -m bench.parity --json parity.json          # MLP and conv nets (several minutes)
    python -m bench.parity --models mlp_digits --onchip-epochs 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from bench import write_json
from bench.accuracy import ROOT, RUNS, example_bundle, float_run, keep_threads

# The conv net's integer settling needs a higher sweep cap than the default 100 (a few
# slow test samples, up to ~220 sweeps; none cycles).
MAX_SWEEPS = {"conv_digits": 300}
PROGRAMS = (("w8", {}),
            ("w8_calibrated", {"calibrate": "digits"}),
            ("w4_calibrated", {"weight_bits": 4, "calibrate": "digits"}),
            ("w4_calibrated_per_channel", {"weight_bits": 4, "calibrate": "digits",
                                           "per_channel": True}))
ONCHIP_LR_SHIFT = 9
PARITY_MODELS = ["mlp_digits", "conv_digits", "conv1_digits"]


def _program_figures(prog, xte, yte, pf) -> dict:
    from epc.runtime.programs import evaluate_program
    m = evaluate_program(prog, xte, yte)
    return {"test_accuracy": m["test_accuracy"],
            "agreement": float((m["predictions"] == pf).mean()),
            "max_sweeps": m["max_sweeps"], "median_sweeps": m["median_sweeps"],
            "unsettled": m["unsettled"], "cycling": m["cycling"], "overflows": m["overflows"]}


def parity(name: str, epochs: int, seed: int, threads: int, tmp: str,
           done: tuple[str, float] | None = None) -> dict:
    """`done`: (trained bundle, its test accuracy) of this very run made elsewhere
    (bench.accuracy trains it with the same settings), used instead of training again."""
    import epc
    from epc.api import compile_source
    from epc.runtime import api
    from epc.runtime.programs import program_dataset
    from epc.targets.neuromorphic.api import load_program

    example, options, extra, _ = RUNS[name]
    if done is None:
        path = example_bundle(example, tmp, options, tag=name)
        ckpt = os.path.join(tmp, f"{name}_ckpt")
        m = api.train(path, epochs=epochs, seed=seed, threads=threads, checkpoint=ckpt,
                      **extra)
        trained, float_acc = os.path.join(ckpt, "last.epc"), m["test_accuracy"]
    else:
        trained, float_acc = done
    over = {"max_sweeps": MAX_SWEEPS[name]} if name in MAX_SWEEPS else None
    g = compile_source(trained, schedule_overrides=over).graph
    _, _, xte, yte = program_dataset("digits", g.inputs[0].shape, num_classes=10)
    fl = float_run(g, xte, yte)
    pf = fl["predictions"]
    out = {"float_test_accuracy": fl["accuracy"],
           "float_train": {"test_accuracy": float_acc, "epochs": epochs,
                           "settings": extra or "defaults",
                           "reused_from_accuracy_run": done is not None}}
    for key, kw in PROGRAMS:
        nc = os.path.join(tmp, f"{name}_{key}.nc")
        epc.compile(g, target="neuromorphic", output=nc, **kw)
        prog = load_program(nc)
        rec = _program_figures(prog, xte, yte, pf)
        rec["points_below_float"] = 100 * (out["float_test_accuracy"] - rec["test_accuracy"])
        out[key] = rec
    return out


def onchip(epochs: int, seed: int, float_acc: float | None, tmp: str) -> dict:
    from epc.compiler.options import CompileOptions
    from epc.api import compile_source
    from epc.runtime.programs import train_program
    from epc.targets.neuromorphic.api import compile_program

    g = compile_source(os.path.join(ROOT, "examples", "mlp_digits.onnx"), CompileOptions(target="neuromorphic")).graph
    path = os.path.join(tmp, "mlp_untrained_w8.nc")
    compile_program(g, path)
    t0 = time.perf_counter()
    m = train_program(path, epochs=epochs, seed=seed, lr_shift=ONCHIP_LR_SHIFT)
    rec = {"epochs": epochs, "lr_shift": ONCHIP_LR_SHIFT, "test_accuracy": m["test_accuracy"],
           "seconds": time.perf_counter() - t0}
    if float_acc is not None:
        rec["float_ep_test_accuracy"] = float_acc
        rec["points_below_float"] = 100 * (float_acc - m["test_accuracy"])
    return rec


def bench_parity(models=None, epochs: int = 30, onchip_epochs: int = 20, seed: int = 0,
                 threads: int = 1, trained: dict | None = None) -> dict:
    """`trained`: bench_accuracy's `keep` dict; a float run it already made with these
    settings is used rather than trained again."""
    res = {"epochs": epochs, "seed": seed, "threads": threads, "models": {}}
    with keep_threads():
        with tempfile.TemporaryDirectory() as tmp:
            for name in models or PARITY_MODELS:
                done = (trained or {}).get((name, seed, epochs, threads))
                res["models"][name] = parity(name, epochs, seed, threads, tmp, done)
                print(f"parity {name}: {json.dumps(res['models'][name])}", flush=True)
            if onchip_epochs:
                f = res["models"].get("mlp_digits", {}).get("float_train", {})
                res["onchip_mlp_digits"] = onchip(onchip_epochs, seed,
                                                  f.get("test_accuracy"), tmp)
                print(f"onchip: {json.dumps(res['onchip_mlp_digits'])}", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.parity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--models", nargs="*", choices=PARITY_MODELS, default=None)
    ap.add_argument("--epochs", type=int, default=30, help="float EP epochs")
    ap.add_argument("--onchip-epochs", type=int, default=20, help="0 skips on-chip learning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = ap.parse_args(argv)
    res = bench_parity(a.models, a.epochs, a.onchip_epochs, a.seed, a.threads)
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
