"""The committed example models: reproducible from build_examples.py, shaped as documented,
and the teacher really is trained."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from epc.compiler.ir import Act, Conv, Dense, MaxPool
from epc.frontends.onnx import load_onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")
_spec = importlib.util.spec_from_file_location("build_examples",
                                               os.path.join(EX, "build_examples.py"))
be = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(be)

SHAPES = {"mlp_digits": (64,), "mlp3_digits": (64,), "conv_digits": (1, 8, 8),
          "conv1_digits": (1, 8, 8),
          "conv_digits_teacher": (1, 8, 8), "vgg_cifar": (3, 32, 32),
          "resnet13": (3, 32, 32), "hopfield_resnet13": (3, 32, 32),
          "mobilenet_cifar": (3, 32, 32), "inception_digits": (1, 8, 8)}


def test_committed_files_are_what_the_script_builds(tmp_path):
    assert be.main(["--out", str(tmp_path), "--skip-teacher"]) == 0
    for name in be.MODELS:
        built = (tmp_path / f"{name}.onnx").read_bytes()
        with open(os.path.join(EX, f"{name}.onnx"), "rb") as f:
            assert f.read() == built, f"examples/{name}.onnx is stale: rerun build_examples.py"


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_documented_shape_and_size(name):
    path = os.path.join(EX, name + ".onnx")
    g = load_onnx(path)
    assert g.inputs[0].shape == SHAPES[name]
    assert g.shape_of(g.outputs[0]) == (10,)
    assert os.path.getsize(path) < 3_000_000
    with open(os.path.join(EX, "README.md")) as f:
        assert f"`{name}.onnx`" in f.read()


def bn_stats(name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(running mean, running var) of every BatchNormalization node in examples/NAME.onnx."""
    m = onnx.load(os.path.join(EX, name + ".onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return [(inits[n.input[3]], inits[n.input[4]]) for n in m.graph.node
            if n.op_type == "BatchNormalization"]


def test_architectures():
    def ops(name):
        return [n.op for n in load_onnx(os.path.join(EX, name + ".onnx")).nodes]

    mlp3 = ops("mlp3_digits")
    assert [o.kind for o in mlp3 if isinstance(o, Dense)] == ["dense"] * 4
    # conv1_digits: one 3x3 conv of 64 filters, one 2x2 max-pool, the readout
    g1 = load_onnx(os.path.join(EX, "conv1_digits.onnx"))
    c1 = [n.op for n in g1.nodes if isinstance(n.op, (Conv, MaxPool, Dense))]
    assert [type(o) for o in c1] == [Conv, MaxPool, Dense]
    assert g1.weights[c1[0].weight].shape == (64, 1, 3, 3) and c1[1].kernel == [2, 2]
    res = ops("resnet13")
    convs = [o for o in res if isinstance(o, Conv)]
    projections = [o for o in convs if o.pads == [0, 0, 0, 0]]   # 1x1 shortcuts
    # 13 weight layers: 12 block convs + the classifier; 3 projection shortcuts beside
    assert len(convs) - len(projections) == 12 and len(projections) == 3
    assert sum(isinstance(o, Dense) for o in res) == 1
    assert sum(o.kind == "add" for o in res) == 6
    # Hopfield-ResNet13: 4 blocks of two 3x3 convs and a 1x1 stride-2 projection skip (no
    # identity skip, no BN) + the classifier: 13 weight layers counting the projections
    hop = ops("hopfield_resnet13")
    convs = [o for o in hop if isinstance(o, Conv)]
    assert len(convs) == 12 and sum(o.pads == [0, 0, 0, 0] for o in convs) == 4
    assert sum(o.stride == [2, 2] for o in convs) == 8
    assert sum(isinstance(o, Dense) for o in hop) == 1
    assert sum(o.kind == "add" for o in hop) == 4
    assert not bn_stats("hopfield_resnet13")
    # every conv is followed by a BatchNorm with non-trivial running statistics (in the
    # file: the frontend folds each into its conv)
    stats = bn_stats("vgg_cifar")
    assert len(stats) == 6
    for mean, var in stats:
        assert np.abs(mean).max() > 1e-3
        assert np.abs(var - 1).max() > 1e-3
    mob = ops("mobilenet_cifar")
    assert sum(isinstance(o, Conv) and o.groups > 1 for o in mob) == 4
    assert all(o.fn.kind == "clip" and o.fn.hi == 6.0 for o in mob if isinstance(o, Act))


def test_teacher_is_trained_on_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    _, xte, _, yte = train_test_split(x, d.target, test_size=0.2, random_state=0)

    def acc(name):
        s = ort.InferenceSession(os.path.join(EX, name + ".onnx"),
                                 providers=["CPUExecutionProvider"])
        return float((s.run(None, {"input": xte})[0].argmax(1) == yte).mean())

    assert acc("conv_digits_teacher") > 0.97
    assert acc("conv_digits") < 0.5   # the untrained initialisation
