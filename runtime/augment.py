"""Training-set augmentation of image inputs: random translation and horizontal flip.

`epc train --augment crop:4,flip` is the CIFAR recipe of the EP (and most vision)
literature: each training sample is padded with 4 zero pixels on every side and a random
window of its own size is cut back out (a shift of up to 4 pixels each way), then mirrored
left-right with probability 1/2. Batches are augmented as they are drawn; evaluation and
the test split never are, and the running train accuracy an epoch reports is measured on
the augmented samples.

The draws come from a generator seeded by (seed, epoch) apart from the shuffle's, so a run
is reproducible and a resumed run draws what the uninterrupted run drew.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from epc.compiler.errors import EpcError

Tensor = torch.Tensor

USAGE = "use crop:N (shift by up to N pixels, zero fill) and/or flip, e.g. crop:4,flip"


@dataclass(frozen=True)
class Augment:
    crop: int = 0        # pad N zero pixels each side, cut a random window of the image's size
    flip: bool = False   # mirror left-right with probability 1/2

    @staticmethod
    def parse(spec: str | None) -> "Augment | None":
        """'crop:4,flip' -> Augment(4, True); None or '' or 'none' -> None."""
        if spec is None or str(spec).strip().lower() in ("", "none"):
            return None
        crop, flip, seen = 0, False, set()
        for item in str(spec).replace(" ", "").lower().split(","):
            kind, _, arg = item.partition(":")
            if kind in seen:
                raise EpcError(f"--augment {spec!r}: {kind} given twice ({USAGE})")
            seen.add(kind)
            if kind == "crop" and arg.isdigit() and int(arg) >= 1:
                crop = int(arg)
            elif kind == "flip" and not arg:
                flip = True
            else:
                raise EpcError(f"--augment {spec!r}: bad item {item!r} ({USAGE})")
        return Augment(crop, flip)

    def spec(self) -> str:
        """The canonical text form (what metrics and checkpoints record)."""
        return ",".join(([f"crop:{self.crop}"] if self.crop else []) +
                        (["flip"] if self.flip else []))

    def check(self, sample_shape: tuple, where: str = "--augment") -> "Augment":
        """Refuse inputs that are not images [C, H, W], or a crop as large as the image."""
        shape = tuple(int(d) for d in sample_shape)
        if len(shape) != 3:
            raise EpcError(f"{where} {self.spec()}: needs image inputs [C, H, W], but the "
                           f"graph's input is {list(shape)} (a flat input has no pixels to "
                           f"shift or mirror; train it without --augment)")
        if self.crop >= min(shape[1:]):
            raise EpcError(f"{where} {self.spec()}: a shift of {self.crop} pixels is not "
                           f"smaller than the {shape[1]}x{shape[2]} image")
        return self

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Augment a batch [B, C, H, W] (draws from `gen`, which lives on the CPU)."""
        b, c, h, w = x.shape
        if self.crop:
            p = self.crop
            dy = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(x.device)
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            ar = lambda k: torch.arange(k, device=x.device)  # noqa: E731
            rows = (dy[:, None] + ar(h))[:, None, :, None]   # [B, 1, H, 1]
            cols = (dx[:, None] + ar(w))[:, None, None, :]   # [B, 1, 1, W]
            x = padded[ar(b)[:, None, None, None], ar(c)[None, :, None, None], rows, cols]
        if self.flip:
            mirror = (torch.rand(b, generator=gen) < 0.5).to(x.device)
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        return x


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The augmentation draws of one epoch: independent of the shuffle's generator, a
    function of (seed, epoch) only, so a resumed run continues the same stream."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), 0xA06]).generate_state(1)
    return torch.Generator().manual_seed(int(state[0]))
