"""The PyTorch frontend against PyTorch itself.

Each model is translated with `load_torch`; the reference interpreter (float64) must
reproduce the module's eval-mode output (computed in float64 from the same float32
weights) on fresh random inputs. Batch norms get non-trivial running statistics so that
their translation is really exercised. Unsupported models must fail with an EpcError
naming the op; the spec loader is exercised on a file written to tmp_path.
"""
from __future__ import annotations

import copy
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from epc.compiler.errors import EpcError
from epc.compiler.ir import (Act, Add, AvgPool, BatchNorm, ChannelScale, Conv, Dense,
                             GlobalAvgPool, MaxPool, Softmax)
from epc.compiler.reference import run_feedforward
from epc.compiler.text import parse, print_graph
from epc.compiler.verify import verify
from epc.frontends.torch import build_module_from_spec, load_torch, load_torch_spec

RTOL = 1e-4


# --------------------------------------------------------------------------- helpers
def _randomize_bn(m: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.3)
                if mod.affine:
                    mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    mod.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return m


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))


def check_matches(model: nn.Module, in_shape: tuple[int, ...], *, batch: int = 3,
                  seed: int = 0):
    """Translate model and compare the reference interpreter with PyTorch; returns graph."""
    torch.manual_seed(seed)
    model = _randomize_bn(model, seed).eval()
    g = load_torch(model, torch.randn(2, *in_shape))
    verify(g)
    assert g.attrs["frontend"] == "torch"
    assert len(g.inputs) == 1 and tuple(g.inputs[0].shape) == tuple(in_shape)
    assert all(w.dtype == np.float32 for w in g.weights.values())
    # the textual form of what the frontend produced round-trips
    assert print_graph(parse(print_graph(g))) == print_graph(g)
    x = torch.randn(batch, *in_shape, generator=torch.Generator().manual_seed(seed + 1))
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        want = ref(x.double()).numpy()
    got = run_feedforward(g, {g.inputs[0].name: x.double().numpy()})[g.outputs[0]]
    assert got.shape == want.shape
    assert _rel_err(got, want) < RTOL
    return g


def kinds(g) -> list[str]:
    return [n.op.kind for n in g.nodes]


# --------------------------------------------------------------------------- models
def mlp():
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 16),
                         nn.ReLU(), nn.Linear(16, 5))


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, stride=2, padding=(1, 0), dilation=(1, 2)),
                         nn.ReLU(), nn.MaxPool2d(3, stride=1, padding=1), nn.Flatten(),
                         nn.Linear(8 * 3 * 1, 10))


def vgg_bn():
    layers, c = [], 3
    for w in (8, "M", 16, 16, "M"):
        if w == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * 4 * 4, 32),
                         nn.BatchNorm1d(32, affine=False), nn.ReLU(), nn.Linear(32, 10))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks=(1, 1, 1), widths=(8, 16, 32), classes=10, in_ch=3, stem=8,
                 imagenet_stem=False):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(nn.Conv2d(in_ch, stem, 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_ch, stem, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        layers, c = [], stem
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(BasicBlock(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(classes=1000):
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), classes, stem=64, imagenet_stem=True)


class MobileNetish(nn.Module):
    """Depthwise-separable blocks with ReLU6, mean-pool head (torch.mean over H, W)."""

    def __init__(self):
        super().__init__()

        def dw(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.ReLU6(inplace=True),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
            dw(8, 16, 1), dw(16, 24, 2), dw(24, 24, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, 10))

    def forward(self, x):
        return self.classifier(self.features(x).mean([2, 3]))


class HardNet(nn.Module):
    """Hardsigmoid, Hardtanh(a, b), F.relu6, clamp, a per-channel scale and a log-softmax."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.hs = nn.Hardsigmoid()
        self.ht = nn.Hardtanh(-0.5, 1.5)
        self.fc1 = nn.Linear(4 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 6)
        self.register_buffer("gain", torch.tensor([0.5, 2.0, -1.0, 3.0]).reshape(4, 1, 1))

    def forward(self, x):
        y = self.hs(self.conv(x)) * self.gain
        y = self.ht(y).flatten(1)
        y = torch.clamp(self.fc1(y), -1.0, 2.0) / 3.0
        return F.log_softmax(self.fc2(F.relu6(y + 0.25)), dim=1)


class PoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.avg1 = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False,
                                 ceil_mode=True)
        self.avg2 = nn.AvgPool2d(2, padding=1, count_include_pad=True)
        self.adapt = nn.AdaptiveAvgPool2d((2, 2))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = self.adapt(self.avg2(self.avg1(y)))
        return self.fc(self.gap(y).view(y.shape[0], -1))


class ArithNet(nn.Module):
    """Input normalisation (x - mean) / std, clamp(min) then clamp(max), negation."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.1, -0.2, 0.3]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.5, 2.0, 1.5]).reshape(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        y = self.conv((x - self.mean) / self.std)
        y = y.clamp(min=0.0).clamp(max=3.0)
        return self.fc(-y.flatten(1))


# --------------------------------------------------------------------------- parity
def test_mlp():
    g = check_matches(mlp(), (20,))
    assert kinds(g) == ["dense", "bias", "act", "dense", "bias", "act", "dense", "bias"]
    assert set(g.weights) == {f"_{i}.{p}" for i in (0, 3, 5) for p in ("weight", "bias")}


def test_small_cnn_with_maxpool():
    g = check_matches(small_cnn(), (1, 12, 12))
    convs = [n.op for n in g.nodes if isinstance(n.op, Conv)]
    assert convs[1].stride == [2, 2] and convs[1].pads == [1, 0, 1, 0]
    assert convs[1].dilation == [1, 2]
    assert sum(isinstance(n.op, MaxPool) for n in g.nodes) == 2
    assert g.weights[g.nodes[1].op.weight].shape == (6, 1, 1)   # conv bias as [C, 1, 1]


def test_vgg_with_batchnorm():
    """Each batch norm (three BatchNorm2d after bias-free convs, a BatchNorm1d without
    affine parameters after a Linear) is folded into the layer before it: its scale into
    the weights, its shift into that layer's one bias."""
    model = vgg_bn()
    g = check_matches(model, (3, 16, 16))
    assert kinds(g) == ["conv", "bias", "act", "maxpool"] + ["conv", "bias", "act"] * 2 + [
        "maxpool", "flatten", "dense", "bias", "act", "dense", "bias"]
    assert not any(isinstance(n.op, (BatchNorm, ChannelScale)) for n in g.nodes)
    conv, bn = model[0], model[1]
    k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    np.testing.assert_allclose(g.weights["_0.weight"], (conv.weight * k.reshape(-1, 1, 1, 1))
                               .detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(g.weights["_0.bias"].reshape(-1),
                               (bn.bias - bn.running_mean * k).detach().numpy(),
                               rtol=1e-5, atol=1e-7)


def test_resnet_blocks_with_projection_shortcuts():
    g = check_matches(ResNet(), (3, 16, 16))
    adds = [n for n in g.nodes if isinstance(n.op, Add)]
    assert len(adds) == 3
    # the two stride-2 blocks have a 1x1 projection, the first an identity skip
    proj = [n for n in g.nodes if isinstance(n.op, Conv) and "shortcut" in n.name]
    assert len(proj) == 2 and all(g.weights[n.op.weight].shape[2:] == (1, 1) for n in proj)
    assert "layers.1.shortcut.0.weight" in g.weights
    names = [n.name for n in g.nodes]
    assert len(names) == len(set(names))
    # one nn.ReLU module used twice per block gives two uniquely named nodes
    assert "layers.0.relu" in names and "layers.0.relu_1" in names


def test_mobilenet_depthwise_relu6():
    g = check_matches(MobileNetish(), (3, 16, 16))
    dws = [n.op for n in g.nodes if isinstance(n.op, Conv) and n.op.groups > 1]
    assert [op.groups for op in dws] == [8, 16, 24]
    acts = {n.op.fn for n in g.nodes if isinstance(n.op, Act)}
    assert all(a.kind == "clip" and (a.lo, a.hi) == (0.0, 6.0) for a in acts)
    assert any(isinstance(n.op, GlobalAvgPool) and not n.op.keepdims for n in g.nodes)


def test_hard_activations_scale_and_log_softmax():
    g = check_matches(HardNet(), (2, 6, 6))
    fns = [n.op.fn for n in g.nodes if isinstance(n.op, Act)]
    hs = fns[0]
    assert hs.kind == "hardsigmoid" and hs.alpha == pytest.approx(1 / 6) and hs.beta == 0.5
    assert (fns[1].kind, fns[1].lo, fns[1].hi) == ("clip", -0.5, 1.5)
    assert (fns[2].kind, fns[2].lo, fns[2].hi) == ("clip", -1.0, 2.0)
    assert (fns[3].kind, fns[3].lo, fns[3].hi) == ("clip", 0.0, 6.0)
    scales = [g.weights[n.op.weight] for n in g.nodes if isinstance(n.op, ChannelScale)]
    np.testing.assert_allclose(scales[0], [0.5, 2.0, -1.0, 3.0])
    np.testing.assert_allclose(scales[1], np.full(12, 1 / 3), rtol=1e-6)
    assert isinstance(g.nodes[-1].op, Softmax) and g.nodes[-1].op.log


def test_normalisation_and_clamp_chain():
    g = check_matches(ArithNet(), (3, 5, 5))
    assert kinds(g)[:3] == ["bias", "chanscale", "conv"]
    np.testing.assert_allclose(g.weights[g.nodes[0].op.weight].reshape(-1), [-0.1, 0.2, -0.3],
                               rtol=1e-6)
    acts = [n.op.fn for n in g.nodes if isinstance(n.op, Act)]
    assert [(a.kind, a.lo, a.hi) for a in acts] == [("clip", 0.0, 3.0)]   # fused clamps


def test_avgpool_and_adaptive_pool():
    g = check_matches(PoolNet(), (3, 13, 11))
    pools = [n.op for n in g.nodes if isinstance(n.op, AvgPool)]
    assert pools[0].ceil_mode and not pools[0].count_include_pad
    assert pools[1].count_include_pad
    assert len(pools) == 3  # the adaptive (2, 2) pool over a 4x4 map is a 2x2 average pool
    assert any(isinstance(n.op, GlobalAvgPool) for n in g.nodes)


def test_softmax_output_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return torch.softmax(self.a(torch.relu(self.a(x))), dim=-1)

    g = check_matches(Tied(), (8,))
    dense = [n.op.weight for n in g.nodes if isinstance(n.op, Dense)]
    assert dense == ["a.weight", "a.weight"] and list(g.weights) == ["a.weight"]
    assert isinstance(g.nodes[-1].op, Softmax)


def test_module_is_left_in_its_mode_and_names_are_sanitized():
    m = nn.Sequential(nn.Linear(4, 3))
    m.train()
    g = load_torch(m, torch.randn(2, 4), name="my model-1")
    assert m.training
    assert g.name == "my_model_1" and g.attrs["source"] == "Sequential"
    assert set(g.weights) == {"_0.weight", "_0.bias"}


# --------------------------------------------------------------------------- refusals
class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=0)     # along the batch: refused


class SortNet(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=1).values


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 4, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


class ProductNet(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


@pytest.mark.parametrize("model, shape, needle", [
    (CatNet(), (2, 4), "aten.cat"),
    (SortNet(), (2, 5), "aten.sort"),
    (nn.Sequential(nn.ConvTranspose2d(2, 2, 2)), (2, 2, 4, 4), "transposed convolution"),
    (LSTMNet(), (2, 3, 4), "LSTM"),
    (ProductNet(), (2, 5), "aten.sigmoid"),
    (nn.Sequential(nn.Conv1d(2, 2, 3)), (2, 2, 8), "Conv2d"),
])
def test_unsupported_ops_are_refused(model, shape, needle):
    with pytest.raises(EpcError) as e:
        load_torch(model, torch.randn(*shape))
    msg = str(e.value)
    assert needle in msg
    assert "supported:" in msg and "Conv2d" in msg
    assert "\n" not in msg


def test_refusal_names_the_user_source_line():
    with pytest.raises(EpcError) as e:
        load_torch(CatNet(), torch.randn(2, 4))
    assert "test_torch_frontend.py:" in str(e.value) and "node cat" in str(e.value)


def test_batch_mixing_reshape_and_bad_inputs_are_refused():
    class Mix(nn.Module):
        def forward(self, x):
            return x.reshape(-1)

    with pytest.raises(EpcError, match="batch"):
        load_torch(Mix(), torch.randn(2, 4))
    with pytest.raises(EpcError, match="batch dimension"):
        load_torch(nn.Linear(4, 2), torch.randn(4))
    with pytest.raises(EpcError, match="nn.Module"):
        load_torch(lambda x: x, torch.randn(2, 4))
    with pytest.raises(EpcError, match="softmax"):
        class Mid(nn.Module):
            def forward(self, x):
                return torch.softmax(x, 1) + 1.0
        load_torch(Mid(), torch.randn(2, 4))


def test_export_failure_is_an_epc_error():
    class Bad(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom in forward")

    with pytest.raises(EpcError, match="torch.export could not capture"):
        load_torch(Bad(), torch.randn(2, 4))


# --------------------------------------------------------------------------- spec loader
MODEL_FILE = textwrap.dedent("""
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(4 * 6 * 6, 3))

        def forward(self, x):
            return self.body(x)

    def make():
        return Net()

    not_a_model = 42

    def broken():
        raise ValueError("factory exploded")

    def returns_int():
        return 3
""")


def test_spec_loader_file_and_module(tmp_path, monkeypatch):
    path = tmp_path / "usermodel_epc_test.py"
    path.write_text(MODEL_FILE)
    for spec in (f"{path}:make", f"{path}:Net"):
        g = load_torch_spec(spec, (1, 1, 8, 8))
        assert g.attrs == {"source": spec, "frontend": "torch"}
        assert tuple(g.inputs[0].shape) == (1, 8, 8)
        assert [n.op.kind for n in g.nodes] == ["conv", "bias", "act", "flatten", "dense",
                                                "bias"]
    monkeypatch.syspath_prepend(str(tmp_path))
    module, example = build_module_from_spec("usermodel_epc_test:make", (2, 1, 8, 8))
    assert isinstance(module, nn.Module) and tuple(example.shape) == (2, 1, 8, 8)
    g = load_torch(module, example)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        want = module.double()(x.double()).numpy()
    got = run_feedforward(g, {g.inputs[0].name: x.double().numpy()})[g.outputs[0]]
    assert _rel_err(got, want) < RTOL


def test_spec_factory_builds_the_same_weights_every_time(tmp_path):
    """An untrained factory draws its weights from torch's global generator: the spec
    loader seeds it, so one spec compiles to one set of weights, and leaves the caller's
    generator where it was."""
    path = tmp_path / "usermodel_seeded.py"
    path.write_text(MODEL_FILE)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_torch_spec(f"{path}:make", (1, 1, 8, 8))
    assert torch.equal(torch.rand(1), before)          # the global stream is untouched
    b = load_torch_spec(f"{path}:make", (1, 1, 8, 8))
    assert set(a.weights) == set(b.weights)
    for k in a.weights:
        np.testing.assert_array_equal(a.weights[k], b.weights[k])


@pytest.mark.parametrize("spec, needle", [
    ("no_such_module_xyz:make", "cannot import module no_such_module_xyz"),
    ("{dir}/missing.py:make", "no such file"),
    ("{file}:nothing", "has no attribute nothing"),
    ("{file}:not_a_model", "not an nn.Module"),
    ("{file}:broken", "factory exploded"),
    ("{file}:returns_int", "expected a torch.nn.Module"),
    ("justaname", "expected a PyTorch model spec"),
])
def test_spec_loader_errors(tmp_path, spec, needle):
    path = tmp_path / "usermodel_bad.py"
    path.write_text(MODEL_FILE)
    spec = spec.format(dir=tmp_path, file=path)
    with pytest.raises(EpcError) as e:
        load_torch_spec(spec, (1, 1, 8, 8))
    assert needle in str(e.value)


def test_spec_loader_bad_shape(tmp_path):
    path = tmp_path / "usermodel_shape.py"
    path.write_text(MODEL_FILE)
    with pytest.raises(EpcError, match="input-shape"):
        load_torch_spec(f"{path}:make", (8,))
    with pytest.raises(EpcError, match="could not capture.*channels"):
        load_torch_spec(f"{path}:make", (1, 2, 8, 8))   # wrong channel count


class _Bad(nn.Module):
    def __init__(self, case: str):
        super().__init__()
        self.case = case

    def forward(self, x):
        r = torch.relu(x)
        if self.case == "concat_batch":
            return torch.cat([r, x], dim=0)
        if self.case == "concat_spatial":
            return torch.cat([r, x], dim=3)
        if self.case == "slice_steps":
            return r[:, ::2]
        return torch.relu(x.reshape(-1, 32))          # mixing samples


@pytest.mark.parametrize("case, why", [
    ("concat_batch", "along the batch"), ("concat_spatial", "only along the channels"),
    ("slice_steps", "step 2"), ("reshape_mixing_samples", "mixes the batch")])
def test_structure_epc_cannot_express_is_refused(case, why):
    """Issue 23's bad input through the PyTorch frontend: one line naming the aten op,
    its node and the reason."""
    with pytest.raises(EpcError) as e:
        load_torch(_Bad(case), torch.zeros(2, 4, 4, 4))
    msg = str(e.value)
    assert "\n" not in msg and why in msg and "node " in msg and "_Bad" in msg


class _CropOfAConcat(nn.Module):
    """DPN's pattern: a slice of a concatenation that takes none of its first part, then
    concatenated again: the first part's chain (placed, cropped past all of it, placed
    again) moves nothing and is dropped; merged into one pad it read as a crop past the
    part's size (timm's dpn68b was an internal error, narrow() of a negative length)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(2, 4, 3, padding=1)
        self.c, self.fc = nn.Conv2d(2, 3, 1), nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        z = torch.cat([y[:, 6:], torch.relu(self.c(x))], 1)
        return self.fc(torch.flatten(z, 1))


def test_a_crop_past_a_concatenated_part_drops_its_term():
    from epc.api import compile_result
    torch.manual_seed(0)
    r = compile_result(_CropOfAConcat().eval(), example_input=torch.zeros(2, 2, 4, 4),
                       verify=True)
    assert r.verify.error < 1e-6
    # a's state (h1) reaches nothing: only b's (h2) and c's (h3) terms feed the output
    assert [(c.src, c.dst) for c in r.graph.couplings] == [
        ("x", "h1"), ("x", "h2"), ("x", "h3"), ("h2", "out"), ("h3", "out")]
