"""StochEP against rate EP: the same example net compiled twice (--neuron rate and
--neuron bernoulli, the same weights at initialisation), trained in one run with the same
seed and settings; per net the test accuracy of both, their gap, seconds per training
epoch side by side (the time steps are the price), and the bernoulli net's spike rate and
synaptic events per inference beside the rate net's multiply-adds.

    python -m bench.stochep --json stochep.json                      # digits MLP, 30 epochs
    python -m bench.stochep --models mlp_digits conv1_digits --epochs 30
    python -m bench.stochep --models mlp784 --data fashion-mnist --epochs 10
    python -m bench.stochep --models mlp_digits --spiking --time-steps 128 --nudge-time-steps 64

Issue 22's target: within 1.0 point of the rate net (digits MLP and conv nets; the
Fashion-MNIST 1-hidden MLP). Timings are only comparable within one run (one thread).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from bench import write_json
from bench.accuracy import ROOT, keep_threads

# example -> extra training settings (as bench.accuracy)
TRAIN = {"mlp_digits": {}, "mlp3_digits": {}, "conv1_digits": {}, "conv_digits": {"lr": 3e-4},
         "mlp784": {}}
# nets without an example file: runtime/zoo.py (mlp784: 784-256-10, 28x28 images flattened)
ZOO = {"mlp784": lambda: __import__("epc.runtime.zoo", fromlist=["mlp"]).mlp(
    (784, 256, 10), name="mlp784")}


def _bundle(example: str, tmp: str, tag: str, options: dict) -> str:
    """The example (or zoo net) compiled with `options`, as a torch bundle; a zoo net is an
    energy graph, which `compile_source` passes through (--neuron bernoulli makes its
    hidden neurons spiking, its weights kept)."""
    from epc.api import compile_source
    from epc.compiler.options import CompileOptions
    from epc.targets.torch import emit
    path = os.path.join(tmp, f"{example}_{tag}.epc")
    src = os.path.join(ROOT, "examples", f"{example}.onnx")
    if example in ZOO:
        src = os.path.join(tmp, f"{example}_source.epc")
        emit(ZOO[example](), src)
    emit(compile_source(src, CompileOptions(**options)).graph, path)
    return path


def _spiking_of(path: str) -> dict:
    """The compiled bundle's spiking schedule: time steps, averaging, tau, sampling."""
    import dataclasses
    from epc.compiler.bundle import read_bundle
    return dataclasses.asdict(read_bundle(path).graph.schedule.spiking)


def bench_stochep(models=("mlp_digits",), data: str = "digits", epochs: int = 30,
                  seed: int = 0, spiking: dict | None = None, log=print) -> dict:
    from epc.runtime.api import train
    spiking = {k: v for k, v in (spiking or {}).items() if v is not None}
    out = {"bench": "stochep", "data": data, "epochs": epochs, "seed": seed,
           "spiking_options": spiking, "runs": {}}
    with keep_threads(), tempfile.TemporaryDirectory() as tmp:
        for ex in models:
            res = {}
            for tag, opts in (("rate", {}), ("bernoulli", {"neuron": "bernoulli", **spiking})):
                path = _bundle(ex, tmp, tag, opts)
                t0 = time.perf_counter()
                m = train(path, data=data, epochs=epochs, seed=seed, threads=1,
                          **TRAIN.get(ex, {}))
                h = m["history"]
                res[tag] = {
                    "test_accuracy": m["test_accuracy"],
                    "best_test_accuracy": m["best_test_accuracy"],
                    "final_train_loss": h[-1]["train_loss"],
                    "seconds_per_epoch": sum(r["seconds"] for r in h) / len(h),
                    "wall_seconds": time.perf_counter() - t0,
                    "mean_free_sweeps": h[-1]["mean_free_sweeps"],
                    "mean_nudged_sweeps": h[-1]["mean_nudged_sweeps"],
                    "multiply_adds_per_inference": h[-1]["multiply_adds_per_inference"],
                    **{k: h[-1][k] for k in ("time_steps", "spike_rate",
                                             "synaptic_events_per_inference") if k in h[-1]},
                    "test_accuracy_per_epoch": [r["test_accuracy"] for r in h]}
                if tag == "bernoulli":     # the spiking part the run had (defaults resolved)
                    res[tag]["spiking"] = _spiking_of(path)
                log(f"stochep {ex} {tag}: test {res[tag]['test_accuracy']:.4f}, "
                    f"{res[tag]['seconds_per_epoch']:.2f} s/epoch")
            r, b = res["rate"], res["bernoulli"]
            res["gap_points"] = 100 * (r["test_accuracy"] - b["test_accuracy"])
            res["time_ratio"] = b["seconds_per_epoch"] / r["seconds_per_epoch"]
            res["within_1_point"] = res["gap_points"] <= 1.0
            out["runs"][ex] = res
    return out


def table(res: dict) -> str:
    lines = [f"StochEP vs rate EP on {res['data']}, {res['epochs']} epochs, seed {res['seed']}"
             f" (bernoulli options: {res['spiking_options'] or 'defaults'})",
             f"{'model':<14} {'rate acc':>9} {'bern acc':>9} {'gap pts':>8} {'rate s/ep':>10} "
             f"{'bern s/ep':>10} {'x':>5} {'spike rate':>10} {'syn events':>11} "
             f"{'rate MACs':>11}"]
    for ex, r in res["runs"].items():
        a, b = r["rate"], r["bernoulli"]
        lines.append(f"{ex:<14} {a['test_accuracy']:>9.4f} {b['test_accuracy']:>9.4f} "
                     f"{r['gap_points']:>8.2f} {a['seconds_per_epoch']:>10.2f} "
                     f"{b['seconds_per_epoch']:>10.2f} {r['time_ratio']:>5.1f} "
                     f"{b.get('spike_rate', 0):>10.3f} "
                     f"{b.get('synaptic_events_per_inference', 0):>11,.0f} "
                     f"{a['multiply_adds_per_inference']:>11,.0f}")
    return "\n".join(lines)


def _count(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def markdown(res: dict) -> str:
    """The results page's table (bench/report.py): one row per net, rate beside bernoulli."""
    from bench.report import num, pct, table as md_table
    rows = []
    for ex, r in res["runs"].items():
        a, b = r["rate"], r["bernoulli"]
        sp = b.get("spiking") or {}
        steps = (f"{sp['time_steps']}/{sp['nudge_time_steps']}, {sp['averaging']}:{sp['tau']}"
                 if sp else num(b.get("time_steps"), 0))
        rows.append([ex, steps, pct(a["test_accuracy"]), pct(b["test_accuracy"]),
                     num(r["gap_points"]), num(a["seconds_per_epoch"]),
                     num(b["seconds_per_epoch"]), f"{num(r['time_ratio'], 1)}x",
                     num(b.get("spike_rate"), 3),
                     _count(b.get("synaptic_events_per_inference")),
                     _count(a.get("multiply_adds_per_inference"))])
    opts = ", ".join(f"{k}={v}" for k, v in res["spiking_options"].items()) or "defaults"
    return (f"### StochEP: bernoulli vs rate neurons on {res['data']} ({res['epochs']} epochs, "
            f"seed {res['seed']}, bernoulli options: {opts})\n\n"
            "Both nets compiled from the same source with the same initial weights and "
            "trained in one run; steps: free/nudged time steps and the rate estimate's "
            "averaging; gap: rate minus bernoulli accuracy (target <= 1.0 point).\n\n"
            + md_table(["model", "steps", "rate", "bernoulli", "gap pts", "rate s/epoch",
                        "bernoulli s/epoch", "time", "spike rate", "synaptic events",
                        "rate MACs"], rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp_digits"], choices=sorted(TRAIN))
    ap.add_argument("--data", default="digits")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-steps", type=int, default=None)
    ap.add_argument("--nudge-time-steps", type=int, default=None)
    ap.add_argument("--averaging", default=None)
    ap.add_argument("--sampling", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = bench_stochep(a.models, a.data, a.epochs, a.seed,
                        {"time_steps": a.time_steps, "nudge_time_steps": a.nudge_time_steps,
                         "averaging": a.averaging, "sampling": a.sampling},
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(res))
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
