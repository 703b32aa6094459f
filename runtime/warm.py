"""Warm start by backprop inside `epc train` (`--backprop-epochs N|auto`, issue 21).

Cold EP does not train every compiled graph: measured on digits (bench.depth, seed 0, 10
epochs), Hopfield-ResNet13 (w8) stays at 6.94% where backprop reaches 95.28%, and the
6-conv VGG and the identity-skip ResNet end 8 test digits below backprop. Started from
backprop-trained weights, EP keeps them (the energy network settles near the feedforward
pass under regulated feedback) and fine-tunes them: warm conversion (docs/training.md).

A run with N > 0 backprop epochs first trains the graph's feedforward form (the source
architecture with the energy form's bounded activations, on the graph's own label cost:
runtime/backprop.py, the machinery of `epc backprop`) for N epochs on the same training
data with the same seed, and then runs its EP epochs from those weights. Those N epochs
are backprop, not EP: the run's recipe says so.

Here: which graphs `auto` warm-starts and for how many epochs, the EP learning rate after
a warm start, and the backprop phase itself.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph
from epc.compiler.passes.residual import depths, output_depth
from epc.compiler.passes.symmetrize import conv_between_states

from .backprop import train_feedforward
from .data import Data
from .engine import Engine

# auto: convolutional graphs with more hidden states on the longest input->output path than
# this, or with a skip coupling between states (one that spans more than one level), are
# warm-started. Measured (digits, seed 0, 10 epochs, cold EP at the defaults vs backprop):
# vgg4 (4 conv states) 98.33 / 98.33% and MLPs up to 8 hidden layers within 0.6 points
# train cold; vgg6 (6) 96.11 / 98.33%, res2 (stem + 2 identity blocks) 96.67 / 98.89% and
# Hopfield-ResNet13 6.94 / 95.28% do not. Warm-started (30 backprop epochs, then 10 EP
# epochs; docs/data/depth_warm_digits.json): vgg6 99.17%, res2 99.44%, HR13 98.06%.
AUTO_MAX_COLD_CONV = 4
# auto's backprop epochs and the backprop learning rate (Adam, cosine to 0): backprop
# epochs cost a fraction of an EP epoch (Hopfield-ResNet13 w8 on digits 0.4-0.6 s vs 2-6 s).
# 30 epochs at 2e-3 (digits, seed 0; backprop / converted before any EP step): vgg6 99.44 /
# 98.61%, res2 99.44 / 97.22%, Hopfield-ResNet13 w8 97.50 / 89.72%; at 5e-3 vgg6 converts to
# 55.28% (97% of free phases at the sweep cap) and HR13's EP fine-tuning ends lower.
AUTO_BACKPROP_EPOCHS = 30
BACKPROP_LR = 2e-3
# the EP learning rate after a warm start, unless --lr is given: the cold default times
# this. Measured after 30 backprop epochs (digits, seed 0; EP lr 1e-4 / 2e-4 / 5e-4, test %
# after the EP epochs): HR13 w8 from backprop at 2e-3, 8 epochs: 95.00 / 97.22 / 97.50;
# from backprop at 5e-3: 94.44 / 95.00 / 94.17 (5e-4 peaks at 96.11 and drifts); vgg6, 5
# epochs: 99.17 / 98.89 / 98.89. Seed 1, HR13 10 epochs: 1e-4 98.33 -> 98.06 (steady),
# 2e-4 98.06 -> 95.56 (drifting), 5e-4 stopped by the divergence watch in epoch 5; vgg6, 5
# epochs: 1e-4 98.61, 2e-4 99.44 (backprop 98.89). Means over the four runs: 97.71 (1e-4)
# and 97.78 (2e-4); the worst run: 1e-4 one test digit below its converted start, 2e-4
# eight. So 1e-4: it kept what backprop and the conversion reached within a test digit.
WARM_LR_FACTOR = 0.2


def auto_rule(g: Graph, meta: dict | None = None) -> tuple[bool, str]:
    """(warm-start?, why in words) for `--backprop-epochs auto` on graph g (a bundle's
    `meta` says whether its weights were trained already)."""
    meta = meta or {}
    if "backprop" in meta:
        return False, "the bundle's weights are backprop-trained already (epc backprop)"
    if "trained" in meta:
        return False, "the bundle's weights are trained already (epc train)"
    if any(s.neuron == "bernoulli" for s in g.states):
        return False, "bernoulli neurons, not measured with a warm start"
    if all(c.feedback_gain == 1.0 for c in g.couplings):
        # backprop's weights convert to 33-67% under symmetric feedback and EP fine-tuning
        # made them worse (research/WARM.md)
        return False, "symmetric feedback, where warm conversion was measured to fail"
    states = {s.name for s in g.states}
    d = depths(g)
    skips = [c for c in g.couplings if c.src in states and c.dst in states
             and d[c.dst] - d[c.src] > 1]
    if skips:
        return True, f"{len(skips)} skip couplings between states"
    hidden = output_depth(g) - 1
    if conv_between_states(g) and hidden > AUTO_MAX_COLD_CONV:
        return True, f"{hidden} convolutional hidden states in depth"
    return False, "cold EP trains this graph"


def resolve_epochs(value, g: Graph, meta: dict | None = None) -> tuple[int, str]:
    """(backprop epochs, why) for --backprop-epochs `value` ('auto' or an int) on g."""
    if value != "auto":
        return int(value), "given"
    warm, why = auto_rule(g, meta)
    return (AUTO_BACKPROP_EPOCHS if warm else 0), f"auto: {why}"


def warm_lr(default_lr: float) -> float:
    return default_lr * WARM_LR_FACTOR


def run_backprop(eng: Engine, d: Data, *, epochs: int, lr: float, batch_size: int,
                 seed: int, progress: Callable | None = None,
                 on_epoch: Callable | None = None) -> dict:
    """Train `eng`'s feedforward form for `epochs` by backprop (runtime/backprop.py,
    as `epc backprop` does) and load the trained weights into the engine. Returns the
    record the run's metrics keep: the backprop history and accuracies."""
    if eng.stochastic:
        raise EpcError("--backprop-epochs trains the feedforward form of rate neurons; this "
                       "network has bernoulli neurons (use --backprop-epochs 0)")
    t0 = time.perf_counter()
    weights, m = train_feedforward(eng, d, epochs=epochs, lr=lr, batch_size=batch_size,
                                   seed=seed, energy_acts=True, loss="graph",
                                   progress=progress, on_epoch=on_epoch)
    with torch.no_grad():
        for k, v in weights.items():
            eng.params[k].copy_(torch.as_tensor(v, device=eng.params[k].device))
    return {"epochs": epochs, "lr": lr, "loss": m["loss"],
            "optimizer": "adam, cosine to 0, no weight decay",
            "activations": "energy", "batch_size": batch_size,
            "initial_feedforward_test_accuracy": m["initial"]["test_accuracy"],
            "train_accuracy": m["train_accuracy"], "test_accuracy": m["test_accuracy"],
            "test_loss": m["test_loss"], "seconds": time.perf_counter() - t0,
            "history": m["history"]}
