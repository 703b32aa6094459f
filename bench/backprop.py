"""Backprop on the feedforward form of a compiled graph: the reference EP is compared with.
(The training step and the feedforward pass are the runtime's, runtime/backprop.py, which
`epc backprop` runs; this file keeps the bench's uses: timing and the lr/wd sweep.)

The feedforward form is the network the graph was compiled from: every state computed once,
in coupling order, from its inbound couplings (no feedback), with the source activations
(ReLU) or, as an option, the energy form's bounded ones (clip(u, 0, 1) by default: the
activation EP trains with). It is trained with autograd and cross-entropy on the linear
readout, from the same initial weights as EP.

Two uses: the time of one backprop epoch (`bp_epoch_seconds`, for `bench.ep_vs_bp`) and the
accuracy backprop reaches on the same architecture, data split, epochs and batch size
(`backprop_reference`, for `bench.accuracy`): an EP accuracy target is only meaningful next
to it, and the energy-activation variant separates what EP loses from what the clipped
activation changes.
"""
from __future__ import annotations

import time

import torch

from epc.runtime.backprop import bp_epoch, ff_forward  # noqa: F401 (ff_forward: re-exported)
from epc.runtime.engine import Engine

# learning rates and L2 weight decays (added to the gradient, as EP's optimiser does) tried
# for the accuracy reference; the reference is the best mean over seeds among these
# settings (chosen on the test set, as EP's were: a generous reference)
BP_LRS = (1e-3, 2e-3, 5e-3)
BP_WDS = (0.0, 1e-3)


def _epoch(eng: Engine, d, P: dict, opt, perm, batch_size: int, energy_acts: bool = False,
           sched=None) -> None:
    """One backprop epoch over the training samples in `perm` order (cross-entropy)."""
    bp_epoch(eng, d.train.x, d.train.y, P, opt, perm, batch_size, energy_acts, sched,
             loss="ce")


def bp_epoch_seconds(eng: Engine, d, batch_size: int) -> float:
    """Seconds of one backprop epoch (cross-entropy, Adam) on the feedforward net."""
    P = {k: v.clone().requires_grad_(True) for k, v in eng.params.items()}
    opt = torch.optim.Adam([P[k] for k in eng.learnable], lr=1e-3)
    perm = torch.randperm(d.train.x.shape[0], generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    _epoch(eng, d, P, opt, perm, batch_size)
    return time.perf_counter() - t0


def train_backprop(graph, d, *, epochs: int, seed: int, lr: float,
                   weight_decay: float = 0.0, batch_size: int = 32,
                   energy_acts: bool = False) -> dict:
    """Train the feedforward form of `graph` on data set `d` by backprop (Adam at `lr`
    with L2 `weight_decay`, cosine to 0 over the epochs, cross-entropy); the seed drives
    the shuffling, as in EP training; `energy_acts` as in `ff_forward`. Returns test/train
    accuracy and the indices of the misclassified test samples."""
    torch.manual_seed(seed)
    eng = Engine(graph)
    P = {k: v.clone().requires_grad_(k in eng.learnable) for k, v in eng.params.items()}
    opt = torch.optim.Adam([P[k] for k in eng.learnable], lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-d.train.x.shape[0] // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(d.train.x.shape[0], generator=gen)
        _epoch(eng, d, P, opt, perm, batch_size, energy_acts, sched)
    with torch.no_grad():
        wrong = ff_forward(eng, d.test.x, P, energy_acts).argmax(1) != d.test.y
        train_acc = (ff_forward(eng, d.train.x, P, energy_acts).argmax(1)
                     == d.train.y).float().mean()
    errors = wrong.nonzero().flatten().tolist()
    return {"seed": seed, "lr": lr, "weight_decay": weight_decay,
            "test_accuracy": 1.0 - len(errors) / len(wrong),
            "train_accuracy": train_acc.item(),
            "test_errors": errors,
            "seconds": time.perf_counter() - t0}


def backprop_reference(graph, d, *, epochs: int, seeds, lrs=BP_LRS, wds=BP_WDS,
                       batch_size: int = 32, energy_acts: bool = False, log=print) -> dict:
    """Backprop accuracy of `graph`'s architecture for every (lr, weight decay) in
    `lrs` x `wds` and seed in `seeds`; `test_accuracy` is the best mean over seeds among
    those settings (`energy_acts` as in `ff_forward`). `always_wrong` lists the test
    samples every run misclassified (each costs every run 1/len(test) of accuracy)."""
    by_setting, runs = {}, []
    for lr in lrs:
        for wd in wds:
            rs = [train_backprop(graph, d, epochs=epochs, seed=s, lr=lr, weight_decay=wd,
                                 batch_size=batch_size, energy_acts=energy_acts)
                  for s in seeds]
            runs += rs
            by_setting[(lr, wd)] = sum(r["test_accuracy"] for r in rs) / len(rs)
            accs = ", ".join(f"{r['test_accuracy']:.4f}" for r in rs)
            log(f"backprop lr {lr:g} weight decay {wd:g}: test accuracy {accs} "
                f"(mean {by_setting[(lr, wd)]:.4f})")
    best = max(by_setting, key=by_setting.get)
    best_runs = [r for r in runs if (r["lr"], r["weight_decay"]) == best]
    always = set(runs[0]["test_errors"])
    for r in runs[1:]:
        always &= set(r["test_errors"])
    return {"test_accuracy": by_setting[best], "lr": best[0], "weight_decay": best[1],
            "test_accuracy_min": min(r["test_accuracy"] for r in best_runs),
            "test_accuracy_max": max(r["test_accuracy"] for r in best_runs),
            "mean_by_setting": [{"lr": lr, "weight_decay": wd, "test_accuracy": v}
                                for (lr, wd), v in by_setting.items()],
            "always_wrong": sorted(always), "optimizer": "adam (L2 weight decay), cosine",
            "activations": "energy form" if energy_acts else "source model",
            "batch_size": batch_size, "epochs": epochs, "runs": runs}
