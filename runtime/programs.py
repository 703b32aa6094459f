"""Neuromorphic programs on data: inference and on-chip learning in the bit-exact simulator,
the resources a program needs, and the float runtime's equilibria that calibrate a
program's quantization.

    run_program("mlp.nc", data="digits")["test_accuracy"]
    train_program("mlp.nc", data="digits", epochs=20, out="mlp_trained.nc")
    acts = calibration_acts(graph, "digits")     # for compile_program(calibration=...)

Program files are the target's (targets/neuromorphic/api.py); these functions read them,
run them and report: nothing here prints (the CLI does, from the returned metrics and the
`on_epoch` records). Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np
import torch

from epc.compiler import flags
from epc.compiler.bundle import atomic_write_bytes
from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph
from epc.targets.neuromorphic.api import load_program, save_program
from epc.targets.neuromorphic.assembler import disassemble
from epc.targets.neuromorphic.isa import Program
from epc.targets.neuromorphic.size import check_program_memory
from epc.targets.neuromorphic.validate import validate

from .data import load_dataset
from .train import Diverged, accuracy_collapse, chance_level

CALIB_SAMPLES = 256


# --------------------------------------------------------------------------- data
def program_dataset(name: str, input_shape, *, data_dir=None, resize=None, num_classes=None):
    """(xtr, ytr, xte, yte) as numpy float64 / int64, shaped to a program's input."""
    d = load_dataset(name, data_dir=data_dir, input_shape=tuple(input_shape), resize=resize,
                     num_classes=num_classes)
    return (d.train.x.double().numpy(), d.train.y.numpy(), d.test.x.double().numpy(),
            d.test.y.numpy())


def calibration_acts(graph: Graph, data: str, *, data_dir=None, resize=None,
                     seed: int = 0) -> dict:
    """Free equilibria of the float runtime (float64, its own settling rules, max-pool
    winner freezing included) on a sample of the training split: state name -> array,
    clamped inputs and teacher states included."""
    from .api import make_engine
    out = graph.output_state()
    xtr, _, _, _ = program_dataset(data, graph.inputs[0].shape, data_dir=data_dir,
                                   resize=resize, num_classes=int(np.prod(out.shape)))
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(xtr), size=min(CALIB_SAMPLES, len(xtr)), replace=False)
    eng, _, _ = make_engine(graph, dtype="float64")
    batch = eng.prepare(torch.as_tensor(xtr[np.sort(idx)], dtype=torch.float64))
    r = eng.settle(batch)
    acts = {k: v.detach().cpu().numpy() for k, v in batch["clamped"].items()}
    acts.update({k: v.detach().cpu().numpy() for k, v in r.states.items()})
    return acts


# --------------------------------------------------------------------------- inspect
def resource_report(prog: Program) -> dict:
    from .simulator import resources
    return resources(prog)


def inspect_program(path, fmt: str = "text") -> str:
    """The program as assembly text with its resources appended, or as JSON."""
    prog = load_program(path)
    res = resource_report(prog)
    if fmt == "json":
        from epc.targets.neuromorphic.isa import format_version
        d = {"program": prog.name, "version": format_version(prog), "frac_bits": prog.frac_bits,
             "beta": prog.beta, "lr_shift": prog.lr_shift, "seed": prog.seed,
             "rng_step": prog.rng_step, "pool_freeze": prog.pool_freeze,
             "spike_seed": prog.spike_seed, "meta": prog.meta,
             "memories": [{"name": m.name, "kind": m.kind, "type": m.type_str(),
                           "shape": list(m.shape), "bytes": m.nbytes} for m in prog.memories],
             "groups": [{"name": g.name, "lo": g.lo, "hi": g.hi, "act": g.act, "role": g.role,
                         "bias": g.bias, "neuron": g.neuron, "tau_shift": g.tau_shift}
                        for g in prog.groups],
             "synapses": [{"name": s.name, "src": s.src, "dst": s.dst, "kind": s.kind,
                           "feedback": s.feedback, "learn": s.learn,
                           "ops": [o.kind for o in s.ops]} for s in prog.synapses],
             "phases": [{"name": p.name, "sweeps": p.sweeps, "classes": p.classes,
                         "pool": "free" if p.hold_pool else "live", "mean": p.mean,
                         "noise": p.noise} for p in prog.phases],
             "resources": res}
        return json.dumps(d, indent=1) + "\n"
    if fmt != "text":
        raise EpcError(f"--format {fmt}: a neuromorphic program prints as text or json")
    lines = [disassemble(prog, elide_over=64).rstrip("\n"), "", "; ---- resources"]
    for k, v in res["memory_bytes"].items():
        lines.append(f";   memory {k:<8} {v:>12,} bytes")
    if "spike_additions_per_step_max" in res:
        ts = res["time_steps"]
        lines.append(f";   bernoulli units                   {res['bernoulli_units']:>14,}"
                     f"  ({ts['free']} free / {ts['nudge']} nudged time steps)")
        lines.append(f";   multiply-adds once per sample     {res['multiply_adds_once']:>14,}"
                     f"  (clamped inputs: the term is held)")
        lines.append(f";   multiply-adds per time step       {res['synops_per_sweep']:>14,}"
                     f"  (rate readers)")
        lines.append(f";   multiply-adds per inference       {res['synops_per_inference_max']:>14,}")
        lines.append(f";   spike additions per time step     "
                     f"{res['spike_additions_per_step_max']:>14,}  (most: every unit firing)")
        lines.append(f";   spike additions per inference     "
                     f"{res['spike_additions_per_inference_max']:>14,}  (most; `epc run` "
                     f"measures them)")
        lines.append(f";   spiking state                     {res['spiking_state_bytes']:>14,}"
                     f" bytes (generators, traces, currents, held inputs, sums)")
        lines.append(f";   synaptic ops per learning step    "
                     f"{res['synops_per_learning_step_max']:>14,}  (multiply-adds, per sample)")
    else:
        lines.append(f";   synaptic ops per sweep            {res['synops_per_sweep']:>14,}")
        lines.append(f";   synaptic ops per inference (cap)  {res['synops_per_inference_max']:>14,}")
        lines.append(f";   synaptic ops per learning step    "
                     f"{res['synops_per_learning_step_max']:>14,}  (cap, per sample)")
    lines.append(f";   parameters                        {res['parameters']:>14,}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- run / train
def _write_metrics(path, m: dict) -> None:
    if path:
        atomic_write_bytes(path, (json.dumps(m, indent=1, sort_keys=True) + "\n").encode())


def evaluate_program(prog: Program, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256,
                     sim=None) -> dict:
    """Inference on (x, y): accuracy, sweeps, unsettled/cycling samples, overflows."""
    from .simulator import Simulator
    sim = sim or Simulator(prog)
    before_ops = sim.stats.synops
    st = sim.stats
    before_spk = (st.spike_events, st.spikes, st.spike_unit_steps)
    preds, sweeps, settled, cycled = [], [], [], []
    for i in range(0, len(x), batch_size):
        # a bernoulli program's spikes are seeded by each sample's index in x, so the
        # results do not depend on the batch size
        p, r = sim.predict(x[i:i + batch_size], np.arange(i, min(i + batch_size, len(x))))
        preds.append(p)
        sweeps.append(r.sweeps)
        settled.append(r.settled)
        cycled.append(r.cycled)
    preds = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    sweeps = np.concatenate(sweeps) if sweeps else np.zeros(0, np.int64)
    settled = np.concatenate(settled) if settled else np.zeros(0, bool)
    cycled = np.concatenate(cycled) if cycled else np.zeros(0, bool)
    n = max(len(x), 1)
    spiking = {}
    if prog.stochastic:
        ev, sp, us = (a - b for a, b in zip((st.spike_events, st.spikes, st.spike_unit_steps),
                                            before_spk))
        spiking = {"synaptic_events_per_inference": ev / n, "spike_rate": sp / max(us, 1),
                   "multiply_adds_per_inference": (st.synops - before_ops) / n,
                   "time_steps": prog.phase("free").sweeps}
    return {**spiking, "test_accuracy": float((preds == y).mean()) if len(y) else 0.0,
            "predictions": preds, "max_sweeps": int(sweeps.max(initial=0)),
            "median_sweeps": float(np.median(sweeps)) if len(sweeps) else 0.0,
            "unsettled": int((~settled).sum()), "cycling": int(cycled.sum()),
            "overflows": sim.stats.overflows, "overflow_detail": sim.stats.as_dict(),
            "synops_per_inference": (sim.stats.synops - before_ops) / n, "samples": len(x)}


def run_program(path, *, data: str = "digits", data_dir=None, resize=None,
                limit: int | None = None, metrics_json=None, batch_size: int = 256) -> dict:
    """Run inference of a program in the bit-exact simulator on a data set's test split."""
    flags.check("batch_size", batch_size)
    flags.check("limit", limit)
    prog = load_program(path)
    out = prog.output_group()
    _, _, xte, yte = program_dataset(data, prog.mem(prog.inputs[0]).shape, data_dir=data_dir,
                                     resize=resize,
                                     num_classes=int(np.prod(prog.mem(out.mem).shape)))
    if limit:
        xte, yte = xte[:limit], yte[:limit]
    check_program_memory(prog, str(path), batch=min(batch_size, len(xte)))
    t0 = time.perf_counter()
    m = evaluate_program(prog, xte, yte, batch_size=batch_size)
    m.pop("predictions")
    m["seconds"] = time.perf_counter() - t0
    m["samples_per_second"] = len(xte) / max(m["seconds"], 1e-9)
    m["resources"] = resource_report(prog)
    m["program"] = str(path)
    _write_metrics(metrics_json, m)
    return m


def train_program(path, *, data: str = "digits", epochs: int = 10, seed: int = 0,
                  lr_shift: int | None = None, beta: float | None = None,
                  metrics_json=None, out=None, data_dir=None, resize=None,
                  batch_size: int = 32, limit: int | None = None, divergence: str = "stop",
                  on_epoch: Callable[[dict], None] | None = None) -> dict:
    """On-chip EP learning in the simulator (integer only); writes the trained program to
    `out` if given. lr_shift / beta override the program's (they are stored in `out`).
    `on_epoch` gets each epoch's record (epoch, train_accuracy, test_accuracy, ...). The
    divergence watch stops (`divergence='stop'`) or warns when the test accuracy falls to
    chance after a healthy start (runtime/train.py: accuracy_collapse)."""
    from epc.targets.neuromorphic.isa import BETA_FRAC

    from .simulator import Simulator
    for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr_shift", lr_shift),
                 ("beta", beta), ("seed", seed), ("limit", limit),
                 ("divergence", divergence)):
        flags.check(k, v)
    prog = load_program(path)
    if lr_shift is not None:
        prog.lr_shift = int(lr_shift)
    if beta is not None:
        bq = int(round(beta * (1 << BETA_FRAC)))
        if not 0 < bq < (1 << (BETA_FRAC + 8)):
            raise EpcError(f"--beta {beta}: must be positive and below 256 (resolution "
                           f"2^-{BETA_FRAC})")
        prog.beta_q = bq
    if prog.beta_q <= 0:
        raise EpcError(f"{path}: nudge strength beta is 0; pass --beta")
    outg = prog.output_group()
    xtr, ytr, xte, yte = program_dataset(data, prog.mem(prog.inputs[0]).shape,
                                         data_dir=data_dir, resize=resize,
                                         num_classes=int(np.prod(prog.mem(outg.mem).shape)))
    if limit:
        xtr, ytr = xtr[:limit], ytr[:limit]
    # a learning step settles three phases of a batch; evaluation runs batches of 256
    check_program_memory(prog, str(path), batch=3 * max(min(batch_size, len(xtr)),
                                                         min(256, len(xte))))
    chance = chance_level(yte)
    sim = Simulator(prog)
    rng = np.random.default_rng(seed)
    history = []
    t0 = time.perf_counter()
    learn_ops = 0
    steps = 0
    for ep in range(epochs):
        perm = rng.permutation(len(xtr))
        correct, n_unsettled = 0, 0
        for i in range(0, len(xtr), batch_size):
            idx = perm[i:i + batch_size]
            ops0 = sim.stats.synops
            free, _, _ = sim.train_batch(xtr[idx], ytr[idx])
            learn_ops += sim.stats.synops - ops0
            steps += len(idx)
            o = free.states[outg.name].reshape(len(idx), -1).argmax(1).numpy()
            correct += int((o == ytr[idx]).sum())
            n_unsettled += int((~free.settled).sum())
        ev = evaluate_program(prog, xte, yte, sim=sim)
        rec = {"epoch": ep + 1, "train_accuracy": correct / max(len(xtr), 1),
               "test_accuracy": ev["test_accuracy"], "unsettled_train": n_unsettled,
               "seconds": time.perf_counter() - t0}
        why = accuracy_collapse(history + [rec], chance)
        if why is not None:
            msg = f"training diverged in epoch {ep + 1}: {why}"
            if divergence == "stop":
                raise Diverged(f"{msg}; stopped; raise --lr-shift (a smaller learning rate), "
                               f"or --divergence warn to go on", record=rec)
            rec["divergence_warning"] = msg
        history.append(rec)
        if on_epoch:
            on_epoch(rec)
    ev = evaluate_program(prog, xte, yte, sim=sim)
    ev.pop("predictions")
    m = {**ev, "epochs": epochs, "history": history, "seconds": time.perf_counter() - t0,
         "train_accuracy": history[-1]["train_accuracy"] if history else None,
         "synops_per_learning_step": learn_ops / max(steps, 1),
         "lr_shift": prog.lr_shift, "beta": prog.beta, "rng_step": prog.rng_step,
         "weight_saturations": sim.stats.overflow_weight, "program": str(path),
         "divergence": divergence,
         "divergence_warnings": [h["divergence_warning"] for h in history
                                 if "divergence_warning" in h]}
    if out:
        validate(prog, source=str(out))
        save_program(prog, out)
        m["out"] = str(out)
    _write_metrics(metrics_json, m)
    return m
