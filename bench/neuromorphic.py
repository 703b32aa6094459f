"""Benchmark of the bit-exact simulator against the float runtime on the same network.

`bench_simulator(quick)` compiles the example digits MLP (and, unless quick, the conv
net and the Inception-style net), settles the digits test set with the float runtime (epc.runtime Engine, float32,
the schedule's tolerance) and with the integer simulator (8-bit weights), and reports
samples per second of each and their ratio, plus agreement and sweep statistics. The
weights are the untrained example initialisations: speed does not depend on training, and
the benchmark stays self-contained.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _one(src: str, repeats: int) -> dict:
    from epc.compiler.options import CompileOptions
    from epc.api import compile_source
    from epc.runtime.api import make_engine
    from epc.runtime.simulator import Simulator
    from epc.runtime.programs import evaluate_program, program_dataset
    from epc.targets.neuromorphic.quantize import quantize_graph
    from epc.targets.neuromorphic.validate import validate

    g = compile_source(src, CompileOptions(target="neuromorphic")).graph
    _, _, xte, yte = program_dataset("digits", g.inputs[0].shape, num_classes=10)
    eng, _, _ = make_engine(g, dtype="float32")
    xt = torch.as_tensor(xte, dtype=torch.float32)
    tf = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = eng.settle(eng.prepare(xt))
        tf.append(time.perf_counter() - t0)
    pf = eng.predict(r.states).numpy()
    prog = validate(quantize_graph(g))
    ts = []
    for _ in range(repeats):
        sim = Simulator(prog)
        t0 = time.perf_counter()
        m = evaluate_program(prog, xte, yte, batch_size=len(xte), sim=sim)
        ts.append(time.perf_counter() - t0)
    n = len(xte)
    f_sps, s_sps = n / min(tf), n / min(ts)
    return {"samples": n, "float_samples_per_second": f_sps,
            "simulator_samples_per_second": s_sps,
            "simulator_over_float_time": min(ts) / min(tf),
            "float_sweeps": int(r.sweeps), "sim_max_sweeps": m["max_sweeps"],
            "sim_median_sweeps": m["median_sweeps"], "sim_unsettled": m["unsettled"],
            "sim_cycling": m["cycling"],
            "agreement": float((m["predictions"] == pf).mean()),
            "synops_per_inference": m["synops_per_inference"]}


def bench_simulator(quick: bool) -> dict:
    """{network: figures} for the digits MLP (and conv net unless quick)."""
    nets = {"mlp_digits": "mlp_digits.onnx"}
    if not quick:
        nets["conv_digits"] = "conv_digits.onnx"
        nets["inception_digits"] = "inception_digits.onnx"   # a channel Concat on the core
    out = {}
    for name, f in nets.items():
        out[name] = _one(os.path.join(EXAMPLES, f), 1 if quick else 3)
    out["threads"] = torch.get_num_threads()
    return out


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(bench_simulator("--quick" in sys.argv), indent=1))
