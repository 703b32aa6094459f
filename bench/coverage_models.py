"""Small PyTorch models with the layouts of torchvision's classification families, for
bench/coverage.py where torchvision itself is not importable (PyPI's torchvision wheel is
a CUDA build that does not load beside the CPU torch epc uses).

These are written here from the published architectures, at reduced widths and depths
and for 32x32 inputs, keeping the ops each family is made of: SqueezeNet's Fire modules
(channel Concat of 1x1 and 3x3 expands, a conv classifier, an adaptive pool), GoogLeNet's
four-branch Inception module (ceil-mode max-pools), DenseNet's dense block (every layer's
input the Concat of all before it, BN-ReLU-conv, average-pool transitions),
ShuffleNetV2's units (channel split, Concat, channel shuffle), VGG's adaptive pool to 7x7
from a smaller map, MobileNetV3's HardSwish and squeeze-excitation gates, EfficientNet's
SiLU and sigmoid gates, ConvNeXt's permutes, LayerNorm and GELU, and a ViT's attention.
They are stand-ins, not torchvision's models: the survey's torchvision stage runs the
real ones where a Python with torchvision is given.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


# --------------------------------------------------------------------------- SqueezeNet
class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x):
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(s)), F.relu(self.expand3x3(s))], 1)


def squeezenet_mini() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(32, 8, 16, 16), Fire(32, 8, 16, 16), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(32, 12, 24, 24), nn.Dropout(0.5), nn.Conv2d(48, 10, 1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())


# --------------------------------------------------------------------------- GoogLeNet
class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, r3: int, c3: int, r5: int, c5: int, pp: int):
        super().__init__()
        self.branch1 = nn.Sequential(*_cbr(cin, c1, 1))
        self.branch2 = nn.Sequential(*_cbr(cin, r3, 1), *_cbr(r3, c3, 3))
        self.branch3 = nn.Sequential(*_cbr(cin, r5, 1), *_cbr(r5, c5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), *_cbr(cin, pp, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x),
                          self.branch4(x)], 1)


def googlenet_mini() -> nn.Module:
    return nn.Sequential(
        *_cbr(3, 32, 3), nn.MaxPool2d(3, 2, ceil_mode=True),
        Inception(32, 16, 16, 24, 4, 8, 8), Inception(56, 24, 24, 32, 6, 12, 12),
        nn.MaxPool2d(3, 2, ceil_mode=True), Inception(80, 32, 16, 32, 4, 8, 8),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Dropout(0.2), nn.Linear(80, 10))


# --------------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, feats: list[torch.Tensor]):
        x = torch.cat(feats, 1)
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseBlock(nn.Module):
    def __init__(self, layers: int, cin: int, growth: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(layers))

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats))
        return torch.cat(feats, 1)


def densenet_mini() -> nn.Module:
    g = 8
    return nn.Sequential(OrderedDict(
        conv0=nn.Conv2d(3, 16, 3, 1, 1, bias=False), norm0=nn.BatchNorm2d(16),
        relu0=nn.ReLU(inplace=True), pool0=nn.MaxPool2d(3, 2, 1),
        block1=DenseBlock(3, 16, g),
        trans1=nn.Sequential(nn.BatchNorm2d(40), nn.ReLU(inplace=True),
                             nn.Conv2d(40, 20, 1, bias=False), nn.AvgPool2d(2, 2)),
        block2=DenseBlock(3, 20, g), norm5=nn.BatchNorm2d(44), relu5=nn.ReLU(inplace=True),
        pool=nn.AdaptiveAvgPool2d((1, 1)), flatten=nn.Flatten(), fc=nn.Linear(44, 10)))


# --------------------------------------------------------------------------- ShuffleNetV2
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, half = stride, cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                *_cbr(cin, half, 1))
        bin_ = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            *_cbr(bin_, half, 1), nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False),
            nn.BatchNorm2d(half), *_cbr(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.branch2(b)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


def shufflenet_v2_mini() -> nn.Module:
    return nn.Sequential(
        *_cbr(3, 24, 3, 2), nn.MaxPool2d(3, 2, 1), ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1),
        ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1), *_cbr(96, 128, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


# --------------------------------------------------------------------------- VGG at a small size
def vgg_mini_adaptive() -> nn.Module:
    """VGG's features end at 2x2 here (32 px in, like vgg11 at 64 px): its AdaptiveAvgPool2d
    to 7x7 then upsamples with unequal windows."""
    return nn.Sequential(
        *_cbr(3, 16), nn.MaxPool2d(2), *_cbr(16, 32), nn.MaxPool2d(2), *_cbr(32, 32),
        nn.MaxPool2d(2), *_cbr(32, 32), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d((7, 7)),
        nn.Flatten(), nn.Linear(32 * 49, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))


# --------------------------------------------------------------------------- gated families
class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int, gate: nn.Module, act: nn.Module):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)
        self.act, self.gate = act, gate

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int, act: type, se: "SqueezeExcite | None"):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(c, expand, 1, bias=False), nn.BatchNorm2d(expand), act(),
            nn.Conv2d(expand, expand, 3, 1, 1, groups=expand, bias=False),
            nn.BatchNorm2d(expand), act(), *( [se] if se is not None else []),
            nn.Conv2d(expand, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.block(x)


def mobilenet_v3_mini() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
        InvertedResidual(16, 48, nn.Hardswish, SqueezeExcite(48, 12, nn.Hardsigmoid(),
                                                             nn.ReLU())),
        InvertedResidual(16, 48, nn.ReLU, None),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.Hardswish(),
        nn.Linear(32, 10))


def efficientnet_mini() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
        InvertedResidual(16, 64, nn.SiLU, SqueezeExcite(64, 4, nn.Sigmoid(), nn.SiLU())),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + y


def convnext_mini() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 4, 4), ConvNeXtBlock(32), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.LayerNorm(32), nn.Linear(32, 10))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, patch: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.block = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.block(t).mean(1))


# name -> (constructor, input [C, H, W], the torchvision family it stands in for)
MODELS = {
    "squeezenet_mini": (squeezenet_mini, (3, 32, 32), "squeezenet1_0/1_1"),
    "googlenet_mini": (googlenet_mini, (3, 32, 32), "googlenet, inception_v3"),
    "densenet_mini": (densenet_mini, (3, 32, 32), "densenet121"),
    "shufflenet_v2_mini": (shufflenet_v2_mini, (3, 32, 32), "shufflenet_v2_x1_0"),
    "vgg_mini_adaptive": (vgg_mini_adaptive, (3, 32, 32), "vgg11/alexnet at 64 px"),
    "mobilenet_v3_mini": (mobilenet_v3_mini, (3, 32, 32), "mobilenet_v3_small/large"),
    "efficientnet_mini": (efficientnet_mini, (3, 32, 32), "efficientnet_b0, regnet_y"),
    "convnext_mini": (convnext_mini, (3, 32, 32), "convnext_tiny"),
    "vit_mini": (TinyViT, (3, 32, 32), "vit_b_16"),
}


def build(name: str) -> nn.Module:
    """The model with PyTorch's default initialisation at seed 0, batch norms given
    non-trivial statistics by a few training-mode passes, in eval mode."""
    ctor, shape, _ = MODELS[name]
    torch.manual_seed(0)
    m = ctor()
    if any(isinstance(x, nn.BatchNorm2d) for x in m.modules()):
        m.train()
        with torch.no_grad():
            for _ in range(3):
                m(torch.randn(8, *shape))
    return m.eval()
