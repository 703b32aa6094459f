"""Data-parallel scaling on this machine: one training epoch in 1 process and in 2.

    python -m bench.scaling [--data fashion-mnist] [--nets NAME ...] [--batch-sizes 32 128]
                            [--reps 3] [--json scaling.json]

For each net (Fashion-MNIST MLPs compiled from PyTorch modules: 784-256-10 and
784-512-256-10; with --data digits, the digits MLPs) and batch size, one epoch of
`epc train` runs as one process, as one process with 2 torch threads, and under
`torchrun --nproc-per-node 2` (the same global batch), alternately `--reps` times, each a
fresh process (its start and data loading are not timed: the figure is the epoch's own
clock, `history[0].seconds`, which stops before the test evaluation). The ratios are per
alternation (a pair run back to back, so load that comes and goes hits both) and their
median. The 1- and 2-process runs must end at the same weights: the largest difference is
recorded. `uptime`'s load average is recorded before every run: on a machine whose cores
are busy with other work, the processes of a data-parallel run wait for each other at
every collective, and the figures say more about the load than about epc; re-run on a
quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import write_json

ROOT = Path(__file__).resolve().parent.parent
FASHION_MLPS = {"fashion_mlp_784_256_10": (784, 256, 10),
                "fashion_mlp_784_512_256_10": (784, 512, 256, 10)}


def load() -> list[float]:
    return list(os.getloadavg())


def fashion_mlp(sizes, path: Path) -> str:
    """An MLP of these widths, PyTorch's default initialisation (seed 0), compiled to a
    torch bundle by the real pipeline."""
    import torch

    import epc
    if not path.exists():
        torch.manual_seed(0)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        epc.compile(torch.nn.Sequential(*layers[:-1]), example_input=torch.zeros(1, sizes[0]),
                    target="torch", output=path)
    return str(path)


def _epoch(bundle: str, data: str, batch: int, how: str, tmp: Path, tag: str,
           data_dir: str | None) -> dict:
    ck, mj = tmp / f"ck_{tag}", tmp / f"{tag}.json"
    args = ["train", bundle, "--data", data, "--epochs", "1", "--batch-size", str(batch),
            "--checkpoint", str(ck), "--metrics-json", str(mj), "-q"]
    if data_dir:
        args += ["--data-dir", data_dir]
    if how == "2 processes":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "-m", "epc"] + args
    else:
        cmd = [sys.executable, "-m", "epc"] + args + (["--threads", "2"]
                                                      if how == "1 process, 2 threads" else [])
    before = load()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr[-2000:]}")
    m = json.loads(mj.read_text())
    h = m["history"][0]
    return {"seconds": h["seconds"], "test_accuracy": h["test_accuracy"],
            "train_loss": h["train_loss"], "processes": m["processes"],
            "threads": m["threads"], "load_before": before, "checkpoint": str(ck)}


def _weights(ck: str) -> dict:
    from epc.compiler.bundle import read_bundle
    return read_bundle(Path(ck) / "last.epc").graph.weights


def bench_scaling(data: str = "fashion-mnist", batches=(32, 128), reps: int = 3,
                  data_dir: str | None = None, nets: dict | None = None,
                  names: list[str] | None = None, threads: bool = True,
                  log=print) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="epc-scaling-"))
    if nets is None:
        if data == "digits":
            nets = {n: str(_compiled(n, tmp)) for n in ("mlp_digits", "mlp3_digits")
                    if names is None or n in names}
        else:
            nets = {n: fashion_mlp(s, tmp / f"{n}.epc") for n, s in FASHION_MLPS.items()
                    if names is None or n in names}
    if not nets:
        raise SystemExit(f"no such net: {names}")
    out = {"data": data, "cpus": os.cpu_count(), "reps": reps, "runs": {}}
    hows = ("1 process", "2 processes") + (("1 process, 2 threads",) if threads else ())
    for name, bundle in nets.items():
        for b in batches:
            key = f"{name} batch {b}"
            runs = {h: [] for h in hows}
            diffs = []
            for r in range(reps):
                for h in hows:
                    runs[h].append(_epoch(bundle, data, b, h, tmp, f"{r}_{len(runs[h])}_"
                                          f"{h.replace(' ', '').replace(',', '')}", data_dir))
                w1 = _weights(runs["1 process"][-1]["checkpoint"])
                w2 = _weights(runs["2 processes"][-1]["checkpoint"])
                diffs.append(max(float(np.abs(w1[k] - w2[k]).max()) for k in w1))
                log(f"{key}: " + ", ".join(f"{h} {runs[h][-1]['seconds']:.1f}s" for h in hows)
                    + f" (load {runs['1 process'][-1]['load_before'][0]:.1f})")
            one = [x["seconds"] for x in runs["1 process"]]
            two = [x["seconds"] for x in runs["2 processes"]]
            thr = [x["seconds"] for x in runs.get("1 process, 2 threads", [])]
            out["runs"][key] = {
                "epoch_seconds": {h: [x["seconds"] for x in runs[h]] for h in hows},
                "speedup_2_processes": float(np.median([a / c for a, c in zip(one, two)])),
                "speedup_2_processes_all": [a / c for a, c in zip(one, two)],
                "speedup_2_threads": (float(np.median([a / c for a, c in zip(one, thr)]))
                                      if thr else None),
                "max_weight_diff_1_vs_2_processes": max(diffs),
                "test_accuracy": {h: [x["test_accuracy"] for x in runs[h]] for h in hows},
                "load_before": {h: [x["load_before"] for x in runs[h]] for h in hows}}
    return out


def _compiled(name: str, tmp: Path) -> Path:
    import epc
    p = tmp / f"{name}.epc"
    epc.compile(ROOT / "examples" / f"{name}.onnx", target="torch", output=p)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist", choices=("fashion-mnist", "digits"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--nets", nargs="+", default=None,
                    help=f"which nets (default: all; Fashion-MNIST: {', '.join(FASHION_MLPS)})")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-threads", action="store_true",
                    help="leave out the 1-process, 2-thread runs (on a loaded machine their "
                         "threads wait for each other's time slices)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = bench_scaling(a.data, tuple(a.batch_sizes), a.reps, a.data_dir, names=a.nets,
                        threads=not a.no_threads)
    res["seconds"] = time.perf_counter() - t0
    res["load_after"] = load()
    print(json.dumps({k: {kk: vv for kk, vv in v.items()
                          if kk.startswith("speedup") or kk.startswith("max_weight")}
                      for k, v in res["runs"].items()}, indent=1))
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
