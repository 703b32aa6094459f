"""Time `load_onnx` on a ResNet-18-sized model (11.7 M parameters, 224x224 ImageNet layout).

    python examples/measure_load.py [--repeat 3]

Builds the ResNet-18 layout in torch (no torchvision needed), exports it with the legacy
exporter to a temporary file, and prints the file size and the load time (best and median
of --repeat runs), also for onnx.load + checker + shape inference alone for comparison.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    import onnx
    import torch

    from epc.frontends.onnx import load_onnx

    spec = importlib.util.spec_from_file_location("build_examples",
                                                  os.path.join(HERE, "build_examples.py"))
    be = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(be)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = be.warm_batchnorm(be.resnet18_imagenet_shape(), (3, 64, 64), 0)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "resnet18.onnx")
        t0 = time.perf_counter()
        be.export_legacy(model, (3, 224, 224), path)
        t_export = time.perf_counter() - t0
        times, base = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            g = load_onnx(path)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            m = onnx.load(path)
            onnx.checker.check_model(m)
            onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
            base.append(time.perf_counter() - t0)
        print(f"resnet18: {params / 1e6:.1f} M parameters, {os.path.getsize(path) / 1e6:.1f} MB, "
              f"{len(g.nodes)} IR nodes; legacy export {t_export:.2f} s")
        print(f"load_onnx: best {min(times):.3f} s, median {statistics.median(times):.3f} s "
              f"(onnx.load + checker + shape inference alone: best {min(base):.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
