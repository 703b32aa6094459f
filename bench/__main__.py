"""Run the epc benchmarks; see bench/__init__.py for what each figure means."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from epc.compiler import ops as O
from epc.runtime import memory, zoo
from epc.runtime.data import load_dataset
from epc.runtime.engine import Engine
from epc.runtime.learn import Optimizer, ep_gradient
from epc.runtime.train import Trainer, TrainConfig

from bench import write_json
from bench.backprop import bp_epoch_seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- models
def models(quick: bool) -> dict:
    """Example models compiled by the real pipeline when present, else hand-built ones."""
    names = ["mlp_digits", "mlp3_digits", "conv_digits", "conv1_digits"]
    out = {}
    try:
        from epc.compiler.options import CompileOptions
        from epc.api import compile_source
        for n in names:
            p = os.path.join(ROOT, "examples", f"{n}.onnx")
            if os.path.exists(p):
                out[n] = compile_source(p, CompileOptions()).graph
    except ImportError:
        pass
    if not out:
        out = {"mlp_digits": zoo.mlp((64, 256, 10)),
               "mlp3_digits": zoo.mlp((64, 256, 128, 64, 10)),
               "conv_digits": zoo.convnet(channels=(32, 64))}
    chain = zoo.mlp((64, 128, 128, 128, 128, 10), name="chain5")
    out["chain5"] = chain
    if quick:
        out = {k: out[k] for k in list(out)[:1] + ["chain5"]}
    return out


def digits_for(eng: Engine):
    return load_dataset("digits", input_shape=eng.input_shapes[eng.inputs[0]])


# --------------------------------------------------------------------------- sweeps
def bench_sweeps(graphs: dict, n: int = 128) -> dict:
    out = {}
    for name, g in graphs.items():
        row = {}
        for mode in ("colour", "sync"):
            # default engine: max-pool winners freeze after 20 sweeps if still cycling
            eng = Engine(g, mode=mode)
            d = digits_for(eng)
            batch = eng.prepare(d.train.x[:n])
            r = eng.settle(batch, max_sweeps=2000, tol=g.schedule.tol)
            row[mode] = {"sweeps": r.sweeps, "unconverged": r.unconverged}
        row["ratio_colour_over_sync"] = row["colour"]["sweeps"] / row["sync"]["sweeps"]
        row["tol"] = g.schedule.tol
        out[name] = row
    return out


# --------------------------------------------------------------------------- baseline
class AutogradBaseline:
    """Published-code style EP: synchronous sweeps, drives = autograd of Phi, every
    coupling applied with the reference ops (plain torch calls: F.conv2d, F.max_pool2d...),
    not the runtime's kernels."""

    def __init__(self, eng: Engine):
        if eng.readouts:
            raise ValueError("the autograd baseline implements heads inside the energy only")
        self.eng = eng

    def zeros(self, n: int) -> dict:
        """Initial states in torch's default layout: the baseline does not take the
        runtime's channels-last state layout (that is one of the runtime's speed-ups)."""
        eng = self.eng
        return {j: torch.zeros((n,) + eng.shapes[j], dtype=eng.dtype, device=eng.device)
                for j in eng.settled}

    def phi(self, S: dict, batch: dict, P: dict | None = None):
        """Phi = sum over couplings c -> j of <s_j, L_c(s_src)> plus <s_j, b_j>."""
        eng = self.eng
        P = eng.params if P is None else P
        vals = dict(batch["clamped"])
        vals.update(S)
        total = 0.0
        for j in eng.settled:
            for l in eng.input_links[j] + eng.inbound[j]:
                total = total + (vals[j] * O.chain_forward(l.ops, vals[l.src], P)[0]).sum()
            if eng.states[j].bias:
                total = total + (vals[j] * P[eng.states[j].bias]).sum()
        return total

    def settle(self, batch, S, beta, labels, sweeps):
        eng = self.eng
        targets = {c.name: eng.cost_target(c, batch, labels) for c in eng.cost_list}
        for _ in range(sweeps):
            leaves = {j: S[j].detach().requires_grad_(True) for j in eng.settled}
            with torch.enable_grad():
                phi = self.phi(leaves, batch)
                if beta:
                    for c in eng.cost_list:
                        phi = phi - beta * c.weight * eng.cost_value(
                            c, leaves[c.state], targets[c.name]).sum()
                grads = torch.autograd.grad(phi, [leaves[j] for j in eng.settled])
            S = {j: O.activate(eng.acts[j], g.detach()) for j, g in zip(eng.settled, grads)}
        return S

    def step(self, x, y, free_sweeps, nudge_sweeps, beta, opt):
        eng = self.eng
        batch = eng.prepare(x)
        s0 = self.settle(batch, self.zeros(batch["n"]), 0.0, y, free_sweeps)
        sp = self.settle(batch, dict(s0), beta, y, nudge_sweeps)
        sm = self.settle(batch, dict(s0), -beta, y, nudge_sweeps)
        P = eng.params
        leaves = {k: P[k].detach().requires_grad_(True) for k in eng.learnable}
        PP = dict(P)
        PP.update(leaves)
        with torch.enable_grad():
            d = self.phi(sp, batch, PP) - self.phi(sm, batch, PP)
            gs = torch.autograd.grad(d, [leaves[k] for k in eng.learnable], allow_unused=True)
        grads = {k: -g / (2 * beta * batch["n"]) for k, g in zip(eng.learnable, gs)
                 if g is not None}
        opt.step(grads)


def bench_throughput(graphs: dict, batches: int, bs: int = 64, free_sweeps: int = 20,
                     nudge_sweeps: int = 10, beta: float = 0.2, reps: int = 5) -> dict:
    out = {}
    for name, g in graphs.items():
        eng = Engine(g, pool_freeze=None)
        d = digits_for(eng)
        xs = [d.train.x[i * bs:(i + 1) * bs] for i in range(batches)]
        ys = [d.train.y[i * bs:(i + 1) * bs] for i in range(batches)]
        opt = Optimizer(eng.params, eng.learnable, lr=1e-4)

        def runtime_epoch():
            for x, y in zip(xs, ys):
                batch = eng.prepare(x)
                f = eng.settle(batch, max_sweeps=free_sweeps, tol=0.0)
                # the runtime settles the +-beta phases together, as its trainer does
                p, m = eng.settle_pair(batch, f.states, beta=beta, labels=y,
                                       max_sweeps=nudge_sweeps, tol=0.0)
                opt.step(ep_gradient(eng, batch, p.states, m.states, beta))

        base = AutogradBaseline(eng)

        def baseline_epoch():
            for x, y in zip(xs, ys):
                base.step(x, y, free_sweeps, nudge_sweeps, beta, opt)

        tr, tb = _side_by_side(runtime_epoch, baseline_epoch, reps)
        ns = batches * bs
        conv = _conv_seconds(runtime_epoch)
        out[name] = {"runtime_samples_per_s": ns / float(np.median(tr)),
                     "baseline_samples_per_s": ns / float(np.median(tb)),
                     "speedup": _median_ratio(tb, tr), "speedup_all": _ratios(tb, tr),
                     "runtime_conv_fraction": conv / float(np.median(tr)),
                     "speedup_ceiling_convs": (float(np.median(tb)) / conv) if conv else None,
                     "free_sweeps": free_sweeps, "nudge_sweeps": nudge_sweeps,
                     "batch_size": bs}
    return out


def _conv_seconds(fn) -> float:
    """Seconds `fn` spends in convolution kernels (forward, transposed, weight gradient),
    from one run under torch.profiler: the sum of their self times, so that nested calls
    (conv2d -> convolution -> mkldnn_convolution) count once. The baseline runs the same
    convolutions, so baseline time / this is the most the runtime could gain over it if
    everything else it does took no time."""
    from torch.profiler import ProfilerActivity, profile
    with _profiler_banner_dropped(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if "conv" in e.key) / 1e6


@contextlib.contextmanager
def _profiler_banner_dropped():
    """Run the block with file descriptor 2 in a temporary file, then pass on what it
    wrote except the profiler's own 'USDT: ... profiler_start/stop' lines (printed by its
    C++ library, which no setting turns off)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            rest = [ln for ln in tmp.read().decode(errors="replace").splitlines(True)
                    if not (ln.startswith("USDT:") and "profiler_st" in ln)]
            sys.stderr.write("".join(rest))


def _side_by_side(fa, fb, reps: int) -> tuple[list[float], list[float]]:
    """Seconds of `fa` and `fb`, run alternately `reps` times after one warm-up each: on a
    shared machine the load changes within seconds, so each pair is compared in time."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return ta, tb


def _ratios(num: list[float], den: list[float]) -> list[float]:
    return [a / b for a, b in zip(num, den)]


def _median_ratio(num: list[float], den: list[float]) -> float:
    """The median over the side-by-side pairs of num/den."""
    return float(np.median(_ratios(num, den)))


# --------------------------------------------------------------------------- EP vs BP
def bench_ep_vs_bp(graphs: dict, reps: int = 5) -> dict:
    """One training epoch of EP (the trainer, default settings) and of backprop (Adam, the
    feedforward net), each from the same initial weights, alternately `reps` times after a
    warm-up; the ratio is the median over the pairs (one epoch each moved by 20% between
    runs here)."""
    out = {}
    for name, g in graphs.items():
        d = digits_for(Engine(g))
        cfg = TrainConfig(epochs=1)
        last = {}

        def ep_epoch() -> float:
            tr = Trainer(Engine(g), d, cfg)
            tr.run()
            last["history"] = tr.state.history[0]
            # the trainer's own clock, which stops before its per-epoch test evaluation
            return tr.state.history[0]["seconds"]

        ep_epoch(), bp_epoch_seconds(Engine(g), d, cfg.batch_size)
        ep_ts, bp_ts = [], []
        for _ in range(reps):
            ep_ts.append(ep_epoch())
            bp_ts.append(bp_epoch_seconds(Engine(g), d, cfg.batch_size))
        h = last["history"]
        out[name] = {"ep_epoch_s": float(np.median(ep_ts)), "bp_epoch_s": float(np.median(bp_ts)),
                     "ratio_ep_over_bp": _median_ratio(ep_ts, bp_ts),
                     "ratio_all": _ratios(ep_ts, bp_ts),
                     "ep_mean_free_sweeps": h["mean_free_sweeps"],
                     "ep_mean_nudged_sweeps": h["mean_nudged_sweeps"]}
    return out


# --------------------------------------------------------------------------- GFLOP/s
def _best(fn, reps: int, trials: int = 5) -> float:
    """Seconds per call of `fn`: the best of `trials` averages over `reps` calls (on a shared
    machine the best trial is the one least disturbed by other load)."""
    fn()
    best = math.inf
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def matmul_peak(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / _best(lambda: a @ b, reps) / 1e9


def settle_macs_per_sweep(eng: Engine) -> int:
    """MACs per sample of one sweep (forward of every inbound chain + adjoint of feedback)."""
    g = eng.graph
    total = 0
    for l in eng.links:
        if l.dst not in eng.inbound or l.src in eng.inputs:
            continue  # input drives are computed once per batch
        shape = tuple(g.shape_of(l.src))
        m = 0
        for op in l.ops:
            o = O.out_shape(op, [shape], g.weights)
            m += O.macs(op, shape, o, g.weights)
            shape = o
        total += m * (2 if l.feedback else 1)
    return total


def bench_gflops(graphs: dict, bs: int, sweeps: int = 20) -> dict:
    peak = matmul_peak()
    out = {"matmul_peak_gflops": peak, "models": {}}
    for name, g in graphs.items():
        eng = Engine(g, pool_freeze=None)
        d = digits_for(eng)
        batch = eng.prepare(d.train.x[:bs])
        t = _best(lambda: eng.settle(batch, max_sweeps=sweeps, tol=0.0), 3)
        flops = 2 * settle_macs_per_sweep(eng) * bs * sweeps
        gf = flops / t / 1e9
        out["models"][name] = {"gflops": gf, "fraction_of_peak": gf / peak, "batch_size": bs}
    return out


SECTIONS = ("sweeps", "throughput", "ep_vs_bp", "gflops", "compile", "neuromorphic",
            "accuracy", "parity")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--quick", action="store_true", help="fast smoke run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=None, metavar="SECTION",
                    help=f"run only these sections ({', '.join(SECTIONS)}); default all. "
                         f"The timing sections take ~1 min, accuracy and parity the rest")
    ap.add_argument("--system-malloc", action="store_true",
                    help="keep the C library's own malloc thresholds (by default the bench, "
                         "like `epc train`, keeps freed tensor memory for reuse: "
                         "runtime/memory.py); both sides of every ratio run under the same one")
    a = ap.parse_args(argv)
    # the first retain_freed_memory call decides for the whole process, the accuracy
    # section's training runs included; the opt-out is the variable it reads
    if a.system_malloc:
        os.environ[memory.OPT_OUT] = "1"
    allocator = memory.retain_freed_memory()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    graphs = models(a.quick)
    want = set(a.only or SECTIONS)
    t0 = time.perf_counter()
    res = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                       "platform": platform.platform(), "threads": a.threads,
                       "cpus": os.cpu_count(), "allocator": allocator},
           "quick": a.quick}
    tp_graphs = {k: v for k, v in graphs.items() if k != "chain5"}

    def section(name, fn):
        if name in want:
            res[name] = fn()
            print(f"{name}:", json.dumps(res[name]), flush=True)

    section("sweeps", lambda: bench_sweeps(graphs))
    section("throughput", lambda: bench_throughput(tp_graphs, batches=2 if a.quick else 5))
    section("ep_vs_bp", lambda: bench_ep_vs_bp({k: v for k, v in tp_graphs.items()
                                                if not a.quick or k.startswith("mlp")}))
    section("gflops", lambda: bench_gflops(tp_graphs, bs=64 if a.quick else 256))
    from bench.compile_speed import bench_compile
    section("compile", lambda: bench_compile(a.quick))
    from bench.neuromorphic import bench_simulator
    section("neuromorphic", lambda: bench_simulator(a.quick))
    from bench.accuracy import bench_accuracy
    from bench.parity import bench_parity
    # the parity section quantizes the float runs the accuracy section trains (seed 0):
    # they are kept and handed over rather than trained twice
    with tempfile.TemporaryDirectory() as kept_dir:
        keep = (kept_dir, {})
        section("accuracy", lambda: bench_accuracy(["mlp_digits"], epochs=2, seeds=[0],
                                                   keep=keep)
                if a.quick else bench_accuracy(keep=keep))
        section("parity", lambda: bench_parity(["mlp_digits"], epochs=2, onchip_epochs=1,
                                               trained=keep[1])
                if a.quick else bench_parity(trained=keep[1]))
    res["seconds"] = time.perf_counter() - t0
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
