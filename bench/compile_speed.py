"""Compile speed on a ResNet-18-sized ONNX file (11.7M parameters, 224x224 ImageNet layout).

The compiler issue asks that compiling such a file take well under a couple of seconds.
The ResNet-18 layout comes from examples/build_examples.py (torchvision is not a
dependency); it is exported with the legacy exporter, BatchNorm nodes kept, and we time
the two halves a user waits for: loading the ONNX file into the feedforward IR
(check, shape inference, constant folding), and the pass pipeline (canonicalize ..
schedule). Best of `repeats` runs, each half timed separately.
"""
from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _build_examples():
    spec = importlib.util.spec_from_file_location("build_examples",
                                                  EXAMPLES / "build_examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_compile(quick: bool = False, repeats: int = 3) -> dict:
    import torch

    from epc.compiler.options import CompileOptions
    from epc.compiler.pipeline import compile_graph
    from epc.frontends.onnx import load_onnx

    be = _build_examples()
    torch.manual_seed(0)
    model = be.warm_batchnorm(be.resnet18_imagenet_shape(), (3, 64, 64), 0)
    with tempfile.TemporaryDirectory() as d:
        path = be.export_legacy(model, (3, 224, 224), str(Path(d) / "resnet18.onnx"))
        size = Path(path).stat().st_size
        load_s, passes_s = [], []
        for _ in range(1 if quick else repeats):
            t0 = time.perf_counter()
            ff = load_onnx(path)
            t1 = time.perf_counter()
            g = compile_graph(ff, CompileOptions())
            t2 = time.perf_counter()
            load_s.append(t1 - t0)
            passes_s.append(t2 - t1)
    return {"model": "resnet18 layout (ImageNet stem, 224x224)", "onnx_bytes": size,
            "parameters": g.num_parameters(), "states": len(g.states),
            "couplings": len(g.couplings), "load_seconds": min(load_s),
            "passes_seconds": min(passes_s),
            "total_seconds": min(a + b for a, b in zip(load_s, passes_s))}


if __name__ == "__main__":
    import json
    print(json.dumps(bench_compile(), indent=1))
