"""Digits accuracy of EP training from the untrained example models (issue targets).

Each example ONNX file is compiled by the real pipeline (`--target torch`) and trained
for 30 epochs, once per seed (0, 1, 2 by default), with the settings docs/results.md quotes:
the CLI defaults (Adam, lr 5e-4, decoupled weight decay 1e-3, beta 0.2 symmetric, batch 32,
cosine; compiled with feedback gain auto: 0.1 a level from two hidden layers on, three
for convolutions, so mlp3_digits is regulated and the conv nets are not) for the MLPs and
the one-layer conv net (conv1_digits), and `--lr 3e-4` for the two-layer conv net
(conv_digits); both conv nets also run compiled with `--pool-first`
(`*_pool_first`). Test accuracy on the fixed `train_test_split(test_size=0.2,
random_state=0)` split of scikit-learn's digits; one test sample is 0.28 points.

Next to each EP figure stands the backprop reference (bench/backprop.py): the same
architecture (the feedforward net the example was compiled from), trained by backprop
with Adam at 1e-3, 2e-3 and 5e-3, each with L2 weight decay 0 and 1e-3 (cosine), the same
epochs, seeds, batch size and split; its figure is the best mean over the seeds among those
six settings, and `always_wrong` lists the test samples every backprop run misclassified.
It runs twice: with the source model's ReLUs (`backprop`) and with the energy form's
clipped activations, the ones EP trains with (`backprop.energy_activations`).

With `--implicit`, each run also trains the same compiled energy model with its exact
gradient (`epc train --gradient implicit`: the loss gradient at the free fixed point by
implicit differentiation) at the same settings and seeds: where EP and this reference end
alike, EP's estimate is not what separates it from backprop; the model and its settling
are. Samples whose adjoint iteration does not converge (no stable fixed point) are left out
of their step's gradient and counted (`excluded_samples`); a step with none left applies no
update (`skipped_steps`).

    python -m bench.accuracy --json acc.json            # all runs, seeds 0 1 2 (~23 min)
    python -m bench.accuracy --models mlp_digits --epochs 2 --seeds 0
    python -m bench.accuracy --models mlp3_digits --implicit --no-backprop
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

from bench import write_json


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# run -> (example file, compile options, extra train settings, target test accuracy)
RUNS = {
    "mlp_digits": ("mlp_digits", {}, {}, 0.985),
    "mlp3_digits": ("mlp3_digits", {}, {}, 0.975),
    "conv_digits": ("conv_digits", {}, {"lr": 3e-4}, 0.990),
    # the same net compiled with --pool-first (states are the pooled maps)
    "conv_digits_pool_first": ("conv_digits", {"pool_first": True}, {"lr": 3e-4}, 0.990),
    # one conv layer: the convolution is the input coupling, the CLI defaults
    "conv1_digits": ("conv1_digits", {}, {}, 0.990),
    "conv1_digits_pool_first": ("conv1_digits", {"pool_first": True}, {}, 0.990),
    # two branches joined by a channel Concat (issue 23: >= 97% in 10 epochs, defaults)
    "inception_digits": ("inception_digits", {}, {}, 0.970),
}


@contextlib.contextmanager
def keep_threads():
    """api.train sets the process-wide torch thread count; give it back afterwards."""
    import torch
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def example_bundle(name: str, tmp: str, options: dict | None = None,
                   tag: str | None = None) -> str:
    """Compile examples/<name>.onnx (with CompileOptions(**options)) for the torch target
    into `tmp`; the bundle's path."""
    from epc.compiler.options import CompileOptions
    from epc.api import compile_source
    from epc.targets.torch import emit
    path = os.path.join(tmp, f"{tag or name}.epc")
    emit(compile_source(os.path.join(ROOT, "examples", f"{name}.onnx"),
                        CompileOptions(**(options or {}))).graph, path)
    return path


def float_run(src, x, y) -> dict:
    """The float runtime (a bundle path or graph) on samples x, labels y as `epc eval` runs
    it: accuracy, loss, convergence and every sample's prediction."""
    import torch
    from epc.runtime.api import make_engine
    from epc.runtime.train import evaluate
    eng, _, _ = make_engine(src, dtype="float32")
    return evaluate(eng, torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y),
                    predictions=True)


def misclassified(bundle: str, d) -> list[int]:
    """Indices of the test samples of data set `d` a trained bundle misclassifies (free
    phase, the trainer's evaluation settings), to set beside backprop's `always_wrong`."""
    pred = float_run(bundle, d.test.x, d.test.y)["predictions"]
    return [int(i) for i in (pred != d.test.y.numpy()).nonzero()[0]]


def _digits_for(example: str):
    """The example compiled with default options, and digits shaped for its input."""
    from epc.compiler.options import CompileOptions
    from epc.api import compile_source
    from epc.runtime.data import load_dataset
    g = compile_source(os.path.join(ROOT, "examples", f"{example}.onnx"), CompileOptions()).graph
    return g, load_dataset("digits", input_shape=tuple(g.inputs[0].shape))


def bench_accuracy(models=None, epochs: int = 30, seeds=(0, 1, 2), threads: int = 1,
                   backprop: bool = True, bp_lrs=None, bp_wds=None,
                   keep: tuple[str, dict] | None = None, implicit: bool = False) -> dict:
    """`keep` = (directory, dict): every trained bundle is copied into the directory and
    the dict maps (run name, seed, epochs, threads) to (bundle path, test accuracy), so
    that bench.parity can use these runs instead of training them again."""
    with keep_threads():
        return _run(models, epochs, list(seeds), threads, backprop, bp_lrs, bp_wds, keep,
                    implicit)


def _backprop(example: str, g, d, epochs: int, seeds: list, threads: int, lrs, wds) -> dict:
    """Backprop's accuracy on the example's architecture `g` (bench.backprop), data `d`,
    same epochs, seeds and batch size as the EP runs: with the source model's activations
    and with the energy form's (`energy_activations`)."""
    import torch

    from bench.backprop import BP_LRS, BP_WDS, backprop_reference
    torch.set_num_threads(threads)
    out = {}
    for energy_acts in (False, True):
        tag = "energy activations" if energy_acts else "source activations"
        out[tag] = backprop_reference(
            g, d, epochs=epochs, seeds=seeds, lrs=lrs or BP_LRS,
            wds=BP_WDS if wds is None else wds, energy_acts=energy_acts,
            log=lambda m: print(f"accuracy {example} {tag} {m}", flush=True))
    res = out["source activations"]
    res["energy_activations"] = out["energy activations"]
    return res


def _train_run(path: str, seed: int, epochs: int, threads: int, extra: dict, data, ck: str,
               gradient: str = "ep") -> tuple[dict, dict]:
    """One training run of the compiled model `path` (checkpoint directory `ck`): its record
    for the JSON (`seconds` is the training alone) and the run's metrics."""
    from epc.runtime import api
    t0 = time.perf_counter()
    m = api.train(path, epochs=epochs, seed=seed, threads=threads, checkpoint=ck,
                  gradient=gradient, **extra)
    secs = time.perf_counter() - t0
    return {"seed": seed, "test_accuracy": m["test_accuracy"],
            "best_test_accuracy": max(h["test_accuracy"] for h in m["history"]),
            "train_accuracy": m["train_accuracy"],
            "unconverged_fraction": m["unconverged_fraction"],
            "skipped_steps": m["skipped_steps"], "steps": sum(h["steps"] for h in m["history"]),
            "excluded_samples": m["excluded_samples"],
            "test_errors": misclassified(m["checkpoint"], data), "seconds": secs}, m


def _implicit(name: str, path: str, epochs: int, seeds: list, threads: int, extra: dict,
              data) -> dict:
    """The compiled model `path` trained with its exact gradient instead of EP's estimate,
    at the run's settings, once per seed."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rec, _ = _train_run(path, seed, epochs, threads, extra, data,
                                os.path.join(tmp, f"s{seed}"), gradient="implicit")
            runs.append(rec)
            print(f"accuracy {name} implicit gradient seed {seed}: {json.dumps(rec)}",
                  flush=True)
    accs = [r["test_accuracy"] for r in runs]
    return {"test_accuracy": sum(accs) / len(accs), "runs": runs}


def _run(models, epochs: int, seeds: list, threads: int, backprop: bool, bp_lrs,
         bp_wds, keep: tuple[str, dict] | None = None, implicit: bool = False) -> dict:
    out = {"epochs": epochs, "seeds": seeds, "threads": threads, "models": {}}
    # the backprop reference per example file: the pool-first run computes the same function
    bp_of: dict[str, dict] = {}
    data_of: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models or list(RUNS):
            example, options, extra, target = RUNS[name]
            if example not in data_of:
                g, data_of[example] = _digits_for(example)
                if backprop:
                    bp_of[example] = _backprop(example, g, data_of[example], epochs, seeds,
                                               threads, bp_lrs, bp_wds)
            path = example_bundle(example, tmp, options, tag=name)
            runs = []
            for seed in seeds:
                rec, m = _train_run(path, seed, epochs, threads, extra, data_of[example],
                                    os.path.join(tmp, f"{name}_seed{seed}"))
                if keep is not None:
                    kept = os.path.join(keep[0], f"{name}_seed{seed}.epc")
                    shutil.copyfile(m["checkpoint"], kept)
                    keep[1][(name, seed, epochs, threads)] = (kept, m["test_accuracy"])
                runs.append(rec)
                print(f"accuracy {name} seed {seed}: {json.dumps(rec)}", flush=True)
            accs = [r["test_accuracy"] for r in runs]
            mean = sum(accs) / len(accs)
            # the target is judged on the mean over seeds: one run moves by a few test
            # samples (0.28 points each) with any change of summation order
            out["models"][name] = {"settings": extra or "defaults",
                                   "compile_options": options or "defaults",
                                   "test_accuracy": mean,
                                   "test_accuracy_min": min(accs),
                                   "test_accuracy_max": max(accs), "runs": runs,
                                   "target": target, "target_met": mean >= target}
            if implicit:
                imp = _implicit(name, path, epochs, seeds, threads, extra, data_of[example])
                out["models"][name]["implicit"] = imp
                out["models"][name]["ep_minus_implicit"] = mean - imp["test_accuracy"]
            if backprop:
                bp = bp_of[example]
                out["models"][name]["backprop"] = bp
                out["models"][name]["ep_minus_backprop"] = mean - bp["test_accuracy"]
                out["models"][name]["ep_minus_backprop_energy_activations"] = (
                    mean - bp["energy_activations"]["test_accuracy"])
            print(f"accuracy {name}: mean {mean:.4f} (min {min(accs):.4f}, max "
                  f"{max(accs):.4f}) target {target}"
                  + (f"; backprop {bp_of[example]['test_accuracy']:.4f}, with the energy "
                     f"activations {bp_of[example]['energy_activations']['test_accuracy']:.4f}"
                     if backprop else ""),
                  flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--models", nargs="*", choices=list(RUNS), default=None)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="training seeds; the figure is the mean over them")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the run is bit-reproducible; with more "
                         "threads the summation order changes and the final accuracy moves "
                         "by a few test samples)")
    ap.add_argument("--no-backprop", action="store_true",
                    help="skip the backprop reference (the same architecture trained by "
                         "backprop: Adam at each of --bp-lrs x --bp-wds, cosine, same "
                         "epochs, seeds, batch size and split)")
    ap.add_argument("--bp-lrs", type=float, nargs="+", default=None,
                    help="backprop learning rates (default 1e-3 2e-3 5e-3); the reference is "
                         "the best mean over the seeds among all settings")
    ap.add_argument("--bp-wds", type=float, nargs="+", default=None,
                    help="backprop L2 weight decays (default 0 1e-3)")
    ap.add_argument("--implicit", action="store_true",
                    help="also train each compiled model with its exact gradient (epc train "
                         "--gradient implicit) at the same settings and seeds: the reference "
                         "that tells EP's estimation error from the energy model's limits "
                         "(mlp3 ~4 min for three seeds, conv_digits ~12 min a seed)")
    a = ap.parse_args(argv)
    res = bench_accuracy(a.models, a.epochs, a.seeds, a.threads, not a.no_backprop,
                         a.bp_lrs, a.bp_wds, implicit=a.implicit)
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
