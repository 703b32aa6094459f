"""Build the example ONNX models shipped in examples/ (seeded, deterministic).

    python examples/build_examples.py                 # rewrite the committed .onnx files
    python examples/build_examples.py --dynamo DIR    # also export each via the dynamo exporter

Every model is exported with the legacy TorchScript exporter (opset 17), input named `input`
with a symbolic batch dimension `N`, output named `logits`. Batch norms are exported as
BatchNormalization nodes (TrainingMode.PRESERVE on a model in eval mode) with non-trivial
running statistics, so that the compiler's BN folding is really exercised. All models are
untrained PyTorch initialisations (EP training starts from there) except
`conv_digits_teacher.onnx`, the conv digits net trained by backprop to serve as a
distillation teacher.

The model constructors are importable (tests load this file by path) so that tests can
export the same architectures on the fly in both exporter forms.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = 17


# --------------------------------------------------------------------------- models
# Named layers (fc1, conv1, ...) so that the compiled IR's weights read fc1.weight, not _0.weight.
def mlp_digits() -> nn.Module:
    return nn.Sequential(OrderedDict(fc1=nn.Linear(64, 256), relu1=nn.ReLU(),
                                     fc2=nn.Linear(256, 10)))


def mlp3_digits() -> nn.Module:
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(64, 256), relu1=nn.ReLU(), fc2=nn.Linear(256, 128), relu2=nn.ReLU(),
        fc3=nn.Linear(128, 64), relu3=nn.ReLU(), fc4=nn.Linear(64, 10)))


def conv_digits() -> nn.Module:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 32, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(32, 64, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc=nn.Linear(64 * 2 * 2, 10)))


def conv1_digits() -> nn.Module:
    """One convolutional layer (64 filters 3x3), a 2x2 max-pool and a linear readout.
    Compiled, its convolution is the input coupling (a constant drive while a phase
    settles) and the pool sits in the coupling to the output, so EP settles one 64x8x8
    state and the output; in conv_digits a convolution couples two settled states."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 64, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc=nn.Linear(64 * 4 * 4, 10)))


class InceptionDigits(nn.Module):
    """A small Inception-style net: a 3x3 stem, then two branches read the stem (a 1x1
    conv and a 3x3 conv), their ReLU outputs are joined by torch.cat along the channels,
    max-pooled and read by a linear layer. Compiled, the stem is a state that both
    branches feed back into, and the concatenation is two placed couplings into the
    output. (A 1x1 reduction before the 3x3 branch, as in GoogLeNet, trained to 94% in
    10 epochs at the defaults, seed 0: one more layer to settle through.)"""

    def __init__(self, stem: int = 16, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, stem, 3, padding=1)
        self.branch1 = nn.Conv2d(stem, width, 1)
        self.branch3 = nn.Conv2d(stem, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * width * 4 * 4, classes)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = torch.cat([torch.relu(self.branch1(s)), torch.relu(self.branch3(s))], dim=1)
        return self.fc(torch.flatten(self.pool(y), 1))


def inception_digits() -> nn.Module:
    return InceptionDigits()


def _conv_bn_relu(cin: int, cout: int, relu6: bool = False, stride: int = 1,
                  groups: int = 1, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU6() if relu6 else nn.ReLU()]


def vgg_cifar(widths=(32, 32, "M", 64, 64, "M", 128, 128, "M"), classes: int = 10,
              in_ch: int = 3, size: int = 32) -> nn.Module:
    layers: list[nn.Module] = []
    c = in_ch
    for w in widths:
        if w == "M":
            layers.append(nn.MaxPool2d(2))
            size //= 2
        else:
            layers += _conv_bn_relu(c, w)
            c = w
    layers += [nn.Flatten(), nn.Linear(c * size * size, classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut (1x1 conv + BN when the shape changes), ReLU after."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: stem conv3x3-BN-ReLU, stages of basic blocks, GAP, linear."""

    def __init__(self, blocks=(2, 2, 2), widths=(16, 32, 64), classes: int = 10,
                 in_ch: int = 3, stem_stride: int = 1, stem_pool: bool = False,
                 stem: bool = True):
        super().__init__()
        self.stem = nn.Sequential()
        c = in_ch
        if stem:
            self.stem = nn.Sequential(*_conv_bn_relu(in_ch, widths[0], stride=stem_stride))
            c = widths[0]
        if stem_pool:
            self.stem.append(nn.MaxPool2d(3, 2, 1))
        stages = []
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                stages.append(BasicBlock(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def resnet13() -> nn.Module:
    """13 weight layers: 3 stages x 2 basic blocks x 2 convs + the linear classifier (the
    1x1 projection shortcuts are not counted, as usual). No separate stem: the first block
    reads the image and projects its shortcut from 3 to 16 channels."""
    return ResNet(blocks=(2, 2, 2), widths=(16, 32, 64), stem=False)


class HopfieldBlock(nn.Module):
    """One block of the Hopfield-ResNet layout (Vinayak & Srinivasan 2025, the seed paper
    on deep EP): a = ReLU(conv3x3(x)), b = ReLU(conv3x3 stride 2 (a) + conv1x1 stride 2 (x)).
    Every skip is a learned projection (no identity skips, no batch norm), and the weights
    start scaled down: `gain` (3x3 convs) and `skip_gain` (1x1) times PyTorch's default
    U(+-1/sqrt(fan_in)), biases halved, the paper's initialisation."""

    def __init__(self, cin: int, cout: int, gain: float = 0.6, skip_gain: float = 0.7):
        super().__init__()
        self.conv_a = nn.Conv2d(cin, cout, 3, 1, 1)
        self.conv_b = nn.Conv2d(cout, cout, 3, 2, 1)
        self.skip = nn.Conv2d(cin, cout, 1, 2, 0, bias=False)   # b's bias is conv_b's
        with torch.no_grad():
            for conv, g in ((self.conv_a, gain), (self.conv_b, gain), (self.skip, skip_gain)):
                conv.weight.mul_(g)
                if conv.bias is not None:
                    conv.bias.mul_(0.5)

    def forward(self, x):
        a = torch.relu(self.conv_a(x))
        return torch.relu(self.conv_b(a) + self.skip(x))


class HopfieldResNet(nn.Module):
    """Four Hopfield blocks (8 hidden states, 12 convolutions) and a linear classifier on
    the flattened last state: 13 weight layers, the seed paper's Hopfield-ResNet13 at
    reduced widths (the paper: 128/256/512/512)."""

    def __init__(self, widths=(32, 64, 128, 128), in_ch: int = 3, size: int = 32,
                 classes: int = 10):
        super().__init__()
        blocks, c = [], in_ch
        for w in widths:
            blocks.append(HopfieldBlock(c, w))
            c, size = w, (size + 1) // 2
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c * size * size, classes)
        with torch.no_grad():
            self.fc.weight.mul_(0.8)
            self.fc.bias.mul_(0.5)

    def forward(self, x):
        return self.fc(torch.flatten(self.blocks(x), 1))


def hopfield_resnet13() -> nn.Module:
    """Hopfield-ResNet13 for 3x32x32 images (CIFAR)."""
    return HopfieldResNet()


def hopfield_resnet13_digits() -> nn.Module:
    """The same layout for 3x8x8 inputs (states 8x8, 4x4, 4x4, 2x2, 2x2, then 1x1): digits
    with `--channels 3`, as the ResNet-13 runs on digits in docs/findings.md use."""
    return HopfieldResNet(in_ch=3, size=8)


def resnet18_imagenet_shape(classes: int = 1000) -> nn.Module:
    """ResNet-18 layout (64..512 channels, stem 7x7/2 + max pool) for load-time measurements."""
    m = ResNet(blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), classes=classes,
               stem_stride=2, stem_pool=True)
    m.stem[0] = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    return m


class DepthwiseSeparable(nn.Module):
    """MobileNet block: depthwise 3x3-BN-ReLU6, pointwise 1x1-BN-ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = nn.Sequential(*_conv_bn_relu(cin, cin, relu6=True, stride=stride, groups=cin))
        self.pw = nn.Sequential(*_conv_bn_relu(cin, cout, relu6=True, k=1))

    def forward(self, x):
        return self.pw(self.dw(x))


def mobilenet_cifar(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        *_conv_bn_relu(3, 32, relu6=True),
        DepthwiseSeparable(32, 64, 1), DepthwiseSeparable(64, 128, 2),
        DepthwiseSeparable(128, 128, 1), DepthwiseSeparable(128, 256, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, classes))


# name -> (constructor, per-sample input shape)
MODELS = {
    "mlp_digits": (mlp_digits, (64,)),
    "mlp3_digits": (mlp3_digits, (64,)),
    "conv_digits": (conv_digits, (1, 8, 8)),
    "conv1_digits": (conv1_digits, (1, 8, 8)),
    "vgg_cifar": (vgg_cifar, (3, 32, 32)),
    "resnet13": (resnet13, (3, 32, 32)),
    "hopfield_resnet13": (hopfield_resnet13, (3, 32, 32)),
    "mobilenet_cifar": (mobilenet_cifar, (3, 32, 32)),
    "inception_digits": (inception_digits, (1, 8, 8)),
}


# --------------------------------------------------------------------------- helpers
def warm_batchnorm(model: nn.Module, in_shape, seed: int, batches: int = 4) -> nn.Module:
    """Give every BN non-trivial running stats (a few random train-mode batches), then eval."""
    g = torch.Generator().manual_seed(seed + 1)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.5
                with torch.no_grad():  # non-trivial affine parameters too
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.uniform_(-0.2, 0.2, generator=g)
        model.train()
        with torch.no_grad():
            for _ in range(batches):
                model(torch.rand(16, *in_shape, generator=g) * 2 - 0.5)
    return model.eval()


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    """The untrained example model `name` (seeded; BN stats warmed, eval mode)."""
    ctor, shape = MODELS[name]
    torch.manual_seed(seed)
    return warm_batchnorm(ctor(), shape, seed), shape


def export_legacy(model: nn.Module, in_shape, path: str, opset: int = OPSET,
                  input_name: str = "input") -> str:
    """Legacy TorchScript export, BN kept as BatchNormalization, dynamic batch."""
    x = torch.zeros(2, *in_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), path, dynamo=False, opset_version=opset,
                          training=torch.onnx.TrainingMode.PRESERVE,
                          input_names=[input_name], output_names=["logits"],
                          dynamic_axes={input_name: {0: "N"}, "logits": {0: "N"}})
    return path


def export_dynamo(model: nn.Module, in_shape, path: str, input_name: str = "input") -> str:
    """torch.export-based export (dynamo=True), dynamic batch; quiet."""
    import contextlib
    import io
    import logging
    x = torch.zeros(2, *in_shape)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model.eval(), (x,), dynamo=True, input_names=[input_name],
                                 output_names=["logits"],
                                 dynamic_shapes=({0: torch.export.Dim("N")},), verbose=False)
        prog.save(path)
    return path


def train_teacher(seed: int = 0, epochs: int = 20) -> tuple[nn.Module, float]:
    """Backprop-train conv_digits on sklearn digits; returns (model, test accuracy)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, digits.target, test_size=0.2, random_state=0)
    xtr, xte = torch.from_numpy(xtr), torch.from_numpy(xte)
    ytr, yte = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()
    torch.manual_seed(seed)
    model = conv_digits()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return model, acc


def _atomic_export(fn, model, shape, path):
    """Export to a temporary file in the target folder, then rename (no half-written files)."""
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=os.path.dirname(path))
    os.close(fd)
    try:
        fn(model, shape, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary shared files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=HERE, help="folder for the legacy exports")
    ap.add_argument("--dynamo", default=None, help="also export via dynamo into this folder")
    ap.add_argument("--skip-teacher", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    for name in MODELS:
        model, shape = build(name)
        path = os.path.join(args.out, name + ".onnx")
        _atomic_export(export_legacy, model, shape, path)
        print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB, input [N, "
              f"{', '.join(map(str, shape))}]")
        if args.dynamo:
            os.makedirs(args.dynamo, exist_ok=True)
            export_dynamo(model, shape, os.path.join(args.dynamo, name + ".onnx"))
    if not args.skip_teacher:
        teacher, acc = train_teacher()
        path = os.path.join(args.out, "conv_digits_teacher.onnx")
        _atomic_export(export_legacy, teacher, (1, 8, 8), path)
        print(f"{path}: backprop-trained teacher, digits test accuracy {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
