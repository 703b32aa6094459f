"""Compile speed on a ResNet-18-sized ONNX file (11.7M parameters, ImageNet stem).

The compiler issue asks that compiling such a file take well under a couple of seconds.
We export a ResNet-18 (written here: torchvision is not a dependency) with the legacy
exporter, then time the two halves a user waits for: loading the ONNX file into the
feedforward IR, and the pass pipeline (canonicalize .. schedule). Best of `repeats`.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.down is None else self.down(x)))


def resnet18(num_classes: int = 1000) -> nn.Module:
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def export_resnet18(path: Path) -> Path:
    torch.manual_seed(0)
    m = resnet18().eval()
    torch.onnx.export(m, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "N"}})
    return path


def bench_compile(quick: bool = False, repeats: int = 3) -> dict:
    from epc.compiler.options import CompileOptions
    from epc.compiler.pipeline import compile_graph
    from epc.frontends.onnx import load_onnx

    with tempfile.TemporaryDirectory() as d:
        path = export_resnet18(Path(d) / "resnet18.onnx")
        size = path.stat().st_size
        load_s, passes_s = [], []
        for _ in range(1 if quick else repeats):
            t0 = time.perf_counter()
            ff = load_onnx(str(path))
            t1 = time.perf_counter()
            g = compile_graph(ff, CompileOptions())
            t2 = time.perf_counter()
            load_s.append(t1 - t0)
            passes_s.append(t2 - t1)
    return {"model": "resnet18 (ImageNet stem, 224x224)", "onnx_bytes": size,
            "parameters": g.num_parameters(), "states": len(g.states),
            "couplings": len(g.couplings), "load_seconds": min(load_s),
            "passes_seconds": min(passes_s),
            "total_seconds": min(a + b for a, b in zip(load_s, passes_s))}


if __name__ == "__main__":
    import json
    print(json.dumps(bench_compile(), indent=1))
