"""One model, one IR: the PyTorch frontend and the ONNX frontend give the same IR text.

Every example model of examples/build_examples.py (and a small model of the ops that compute
nothing at inference: Identity, Dropout, an output LogSoftmax) is compiled from the
nn.Module (torch.export) and from its ONNX exports:
* by the legacy exporter with batch norms kept (as build_examples.py exports), every model;
* by the legacy exporter at its defaults, which folds each batch norm into its conv under
  an anonymous name ('onnx::Conv_145'): the models with batch norms;
* by the dynamo exporter (slow to export; it also folds batch norms itself): a subset.
The feedforward IR each frontend produces and the energy IR compiled from it must print the
same text, except the provenance attributes (source, frontend, opset), with weights equal:
bit for bit where epc folds both sides from the same float32 parameters, else to float32
rounding. The dynamo exports are also run against onnxruntime and PyTorch here.

resnet18_imagenet_shape is left out (about 3 s of export and tracing for a layout that
resnet13 and the padded max-pool of passthrough_net already cover).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from collections import OrderedDict

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from epc.compiler.options import CompileOptions
from epc.compiler.pipeline import compile_graph
from epc.compiler.reference import run_feedforward
from epc.compiler.text import print_graph
from epc.frontends.onnx import load_onnx
from epc.frontends.torch import load_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "build_examples", os.path.join(ROOT, "examples", "build_examples.py"))
be = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(be)


def passthrough_net() -> nn.Module:
    """Conv-BN-ReLU, Identity, Dropout, a padded max-pool, ReLU6 and an output LogSoftmax:
    what the ONNX path used to keep as Identity/Dropout nodes."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(2, 6, 3, padding=1), bn=nn.BatchNorm2d(6), relu=nn.ReLU(),
        keep=nn.Identity(), drop=nn.Dropout(0.2), pool=nn.MaxPool2d(3, 2, 1),
        flatten=nn.Flatten(), fc1=nn.Linear(6 * 3 * 3, 12), relu6=nn.ReLU6(),
        drop2=nn.Dropout(0.5), fc2=nn.Linear(12, 4), out=nn.LogSoftmax(dim=1)))


class ShuffleNet(nn.Module):
    """Issue 23's linear structure: a channel split (Split), two branches joined by a
    channel Concat, a channel shuffle (Reshape-Transpose-Reshape: one Permute), a crop
    (Slice) and a spatial Pad."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.left = nn.Conv2d(4, 4, 3, padding=1)
        self.right = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8 * 7 * 7, 5)

    def forward(self, x):
        a, b = torch.split(torch.relu(self.stem(x)), 4, dim=1)
        y = torch.cat([torch.relu(self.left(a)), torch.relu(self.right(b))], dim=1)
        n, c, h, w = y.shape
        y = y.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        y = nn.functional.pad(y[:, :, 1:, :-1], (1, 0, 0, 1))
        return self.fc(torch.flatten(y, 1))


def adaptive_net() -> nn.Module:
    """An adaptive average pool whose windows differ in size (7 -> 3: windows of 3, 3
    and 3 rows starting at 0, 2, 4): the legacy exporter refuses it, the dynamo exporter
    decomposes it into many nodes that the ONNX frontend takes back as one op."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(2, 4, 3, padding=1), relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d((3, 3)),
        flatten=nn.Flatten(), fc=nn.Linear(4 * 3 * 3, 5)))


# name -> (constructor, per-sample input shape)
MODELS = {**be.MODELS,
          "hopfield_resnet13_digits": (be.hopfield_resnet13_digits, (3, 8, 8)),
          "passthrough_net": (passthrough_net, (2, 6, 6)),
          "shuffle_net": (ShuffleNet, (2, 7, 7)),
          "adaptive_net": (adaptive_net, (2, 7, 7))}
# what the legacy exporter cannot export (an adaptive pool to a size that does not divide)
NO_LEGACY = ["adaptive_net"]
# BN folding, residual joins, ReduceMean/Reshape/Clip forms, depthwise convs, Identity/Dropout;
# Split/Concat/shuffle/Slice/Pad, the decomposed adaptive pool
DYNAMO = ["resnet13", "mobilenet_cifar", "passthrough_net", "shuffle_net", "adaptive_net"]
# the legacy exporter at its defaults (training=EVAL) folds each BN into its conv itself and
# names the folded tensors anonymously ('onnx::Conv_145'): the models with batch norms
FOLDED = ["vgg_cifar", "resnet13", "mobilenet_cifar", "passthrough_net"]


def export_with_defaults(model, shape, path: str, in_name: str) -> str:
    """torch.onnx.export as a user calls it (legacy exporter, eval mode, constant folding)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, *shape),), path, dynamo=False,
                          input_names=[in_name], dynamic_axes={in_name: {0: "N"}})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> {'module', 'shape', 'torch' | 'legacy' | 'dynamo': feedforward Graph,
    'dynamo_path'}; each graph is named after the model (an ONNX file's graph is named after
    the file)."""
    d = tmp_path_factory.mktemp("agree")
    (d / "dynamo").mkdir()
    out = {}
    for name, (ctor, shape) in MODELS.items():
        torch.manual_seed(0)
        model = be.warm_batchnorm(ctor(), shape, 0)
        m = {"module": model, "shape": shape,
             "torch": load_torch(model, torch.zeros(2, *shape), name=name)}
        in_name = m["torch"].inputs[0].name
        # the input named as torch.export names it (the forward argument: 'x', 'input')
        if name not in NO_LEGACY:
            m["legacy"] = load_onnx(be.export_legacy(model, shape, str(d / f"{name}.onnx"),
                                                     input_name=in_name))
        if name in FOLDED:
            (d / "defaults").mkdir(exist_ok=True)
            m["legacy_defaults"] = load_onnx(export_with_defaults(
                model, shape, str(d / "defaults" / f"{name}.onnx"), in_name))
        if name in DYNAMO:
            m["dynamo_path"] = be.export_dynamo(model, shape, str(d / "dynamo" / f"{name}.onnx"),
                                                input_name=in_name)
            m["dynamo"] = load_onnx(m["dynamo_path"])
        out[name] = m
    return out


def text(g) -> str:
    """The IR text without the provenance attributes (source file, frontend, opset)."""
    return "".join(line for line in print_graph(g).splitlines(keepends=True)
                   if not line.startswith("  attr "))


def assert_same(a, b, tol: float):
    """Same text; every weight equal to `tol` times its largest magnitude (a folded bias
    shift - mean * k can cancel to a small number, so relative to each element is too strict)."""
    assert text(a) == text(b)
    assert set(a.weights) == set(b.weights)
    for k, wa in a.weights.items():
        err = float(np.max(np.abs(wa.astype(np.float64) - b.weights[k]), initial=0.0))
        assert err <= tol * float(np.max(np.abs(wa), initial=0.0)), (k, err)


CASES = ([(name, "legacy") for name in MODELS if name not in NO_LEGACY] + [(name, "legacy_defaults") for name in FOLDED]
         + [(name, "dynamo") for name in DYNAMO])


@pytest.mark.parametrize("name, exporter", CASES)
def test_same_feedforward_and_energy_ir(models, name, exporter):
    g_torch, g_onnx = models[name]["torch"], models[name][exporter]
    # the legacy exporter keeps the parameters (epc folds the batch norms of both from the
    # same float32 values: the same bits); with its defaults, and the dynamo exporter, fold
    # them in float32 themselves
    tol = 0.0 if exporter == "legacy" else 1e-6
    assert_same(g_torch, g_onnx, tol)
    opts = CompileOptions()
    assert_same(compile_graph(g_torch, opts), compile_graph(g_onnx, opts), tol)


@pytest.mark.parametrize("name", DYNAMO)
def test_dynamo_export_matches_onnxruntime_and_torch(models, name):
    m = models[name]
    g = m["dynamo"]
    assert int(g.attrs["opset"]) >= 18
    x = np.random.default_rng(0).uniform(-1, 2, (5, *m["shape"])).astype(np.float32)
    got = run_feedforward(g, {g.inputs[0].name: x})[g.outputs[0]]
    s = ort.InferenceSession(m["dynamo_path"], providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want_torch = m["module"](torch.from_numpy(x)).numpy()
    for want in (s.run(None, {s.get_inputs()[0].name: x})[0], want_torch):
        assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_what_the_agreement_covers(models):
    """The shared IR has what each model is there for: folded batch norms (no BatchNorm
    node, one bias per conv), no node for Identity/Dropout, a fused ReLU6, residual adds,
    and the output LogSoftmax kept for the compiler to drop."""
    kinds = {name: [n.op.kind for n in m["torch"].nodes] for name, m in models.items()}
    assert all("batchnorm" not in k and "identity" not in k and "dropout" not in k
               for k in kinds.values())
    assert kinds["passthrough_net"] == ["conv", "bias", "act", "maxpool", "flatten", "dense",
                                        "bias", "act", "dense", "bias", "softmax"]
    assert kinds["resnet13"].count("add") == 6 and kinds["vgg_cifar"].count("bias") == 7
    names = [n.name for n in models["resnet13"]["torch"].nodes]
    assert names[:3] == ["stages.0.conv1", "stages.0.conv1_bias", "stages.0.relu"]
    assert "stages.0.shortcut.0_bias" in names and "stages.5.relu_1" in names
    # issue 23's ops: the split as two crops (pads), the concat, one permute for the
    # shuffle, the slice's two crops and the pad; the adaptive pool as one op
    assert kinds["shuffle_net"] == ["conv", "bias", "act", "pad", "pad", "conv", "bias", "act",
                                    "conv", "bias", "act", "concat", "permute", "pad", "pad",
                                    "pad", "flatten", "dense", "bias"]
    assert kinds["adaptive_net"] == ["conv", "bias", "act", "adaptiveavgpool", "flatten",
                                     "dense", "bias"]
    assert kinds["inception_digits"].count("concat") == 1


def test_zero_biases_are_kept_by_both_frontends(tmp_path):
    """A zero-initialised bias is still a parameter EP trains: both frontends keep it.
    (The dynamo exporter's optimizer removes an all-zero Gemm/Conv bias before epc sees the
    file, which is why no zero bias is in the dynamo cases above.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].bias.zero_()
    g_torch = load_torch(model, torch.zeros(2, 5), name="zb")
    g_onnx = load_onnx(be.export_legacy(model, (5,), str(tmp_path / "zb.onnx")))
    assert_same(g_torch, g_onnx, 0.0)
    assert not np.any(g_torch.weights["_0.bias"])
    assert [n.op.kind for n in g_torch.nodes] == ["dense", "bias", "act", "dense", "bias"]
