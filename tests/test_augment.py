"""Training-set augmentation (`epc train --augment crop:N,flip`): what each draw does to an
image, that the draws are reproducible, and that an augmented run resumes exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from epc.compiler.bundle import read_bundle
from epc.compiler.errors import EpcError
from epc.runtime import zoo
from epc.runtime.api import train
from epc.runtime.augment import Augment, epoch_generator
from epc.targets.torch import emit

torch.set_num_threads(1)


def _shifted(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """img [C, H, W] moved by (dy, dx) pixels (down/right positive), zeros coming in."""
    out = np.zeros_like(img)
    h, w = img.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(200, 2, 6, 7, generator=g) + 0.5   # no pixel is 0: zeros show the fill


def test_crop_moves_each_image_by_one_of_every_offset(images):
    p = 2
    out = Augment(crop=p)(images, torch.Generator().manual_seed(1)).numpy()
    assert out.shape == images.shape
    offsets = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)]
    seen = set()
    for x, y in zip(images.numpy(), out):
        hits = [o for o in offsets if np.array_equal(y, _shifted(x, *o))]
        assert len(hits) == 1, "each output is exactly one zero-filled shift of its input"
        seen.add(hits[0])
    assert seen == set(offsets)      # 200 draws over 25 offsets: every one occurs


def test_flip_mirrors_about_half(images):
    out = Augment(flip=True)(images, torch.Generator().manual_seed(1))
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(3)).flatten(1).all(1)
    assert bool((same ^ mirrored).all())
    assert 70 < int(mirrored.sum()) < 130


def test_crop_and_flip_compose(images):
    both = Augment(crop=1, flip=True)(images, torch.Generator().manual_seed(3)).numpy()
    for x, y in zip(images.numpy(), both):
        assert any(np.array_equal(y, _shifted(v, dy, dx))
                   for v in (x, x[:, :, ::-1]) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def test_draws_are_a_function_of_seed_and_epoch(images):
    aug = Augment(crop=2, flip=True)
    a = aug(images, epoch_generator(0, 5))
    assert torch.equal(a, aug(images, epoch_generator(0, 5)))
    assert not torch.equal(a, aug(images, epoch_generator(0, 6)))
    assert not torch.equal(a, aug(images, epoch_generator(1, 5)))


def test_parse_and_check():
    assert Augment.parse("crop:4,flip") == Augment(4, True)
    assert Augment.parse(" flip , crop:2 ").spec() == "crop:2,flip"
    assert Augment.parse(None) is None and Augment.parse("none") is None
    for bad in ("crop", "crop:0", "crop:-1", "crop:a", "rotate", "flip:1", "flip,flip"):
        with pytest.raises(EpcError, match="--augment"):
            Augment.parse(bad)
    with pytest.raises(EpcError, match=r"image inputs \[C, H, W\].*\[64\]"):
        Augment(crop=1).check((64,))
    with pytest.raises(EpcError, match="not smaller than the 8x8 image"):
        Augment(crop=8).check((1, 8, 8))
    Augment(crop=7).check((1, 8, 8))


@pytest.fixture(scope="module")
def conv_path(tmp_path_factory):
    """The conv example (a smaller zoo conv net learns too slowly to show anything in 2
    epochs)."""
    import epc
    from conftest import EXAMPLES
    p = tmp_path_factory.mktemp("c") / "conv.epc"
    epc.compile(str(EXAMPLES / "conv_digits.onnx"), target="torch", output=str(p))
    return str(p)


def test_augmented_run_resumes_exactly_and_differs_from_plain(conv_path, tmp_path):
    kw = dict(epochs=2, seed=2, lr=1e-3, augment="crop:1,flip")
    full = train(conv_path, checkpoint=str(tmp_path / "a"), **kw)
    assert full["config"]["augment"] == "crop:1,flip"
    train(conv_path, checkpoint=str(tmp_path / "b"), stop_after=1, **kw)
    rest = train(conv_path, checkpoint=str(tmp_path / "b"), resume=True, **kw)
    wa = read_bundle(tmp_path / "a" / "last.epc").graph.weights
    wb = read_bundle(tmp_path / "b" / "last.epc").graph.weights
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    assert [h["train_loss"] for h in rest["history"]] == [h["train_loss"] for h in full["history"]]
    plain = train(conv_path, epochs=1, seed=2, lr=1e-3)
    assert plain["history"][0]["train_loss"] != full["history"][0]["train_loss"]
    # it still learns (chance is 0.1; 0.41 measured, 0.88 without augmentation: the
    # shifted and mirrored digits are a harder task for two epochs)
    assert full["test_accuracy"] > 0.25
    # resuming with other augmentation settings is refused
    with pytest.raises(EpcError, match="incompatible checkpoint.*augment"):
        train(conv_path, checkpoint=str(tmp_path / "b"), resume=True,
              **{**kw, "augment": "crop:2"})


def test_cli_errors_one_line(cli, conv_path, tmp_path):
    mlp = tmp_path / "mlp.epc"
    emit(zoo.mlp((64, 16, 10)), mlp, None)
    for model, spec, match in ((mlp, "crop:1", "needs image inputs"),
                               (conv_path, "shear", "bad item 'shear'"),
                               (conv_path, "crop:9", "not smaller than")):
        r = cli("train", model, "--epochs", "1", "--augment", spec)
        err = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(err) == 1 and err[0].startswith("epc: error:"), r.output
        assert match in err[0]
