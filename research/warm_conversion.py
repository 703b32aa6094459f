"""Warm conversion on digits (issue 21, items 2 and 6): backprop-train the compiled graph's
feedforward form (`epc.backprop`), report the converted EP network's accuracy before any EP
step, then fine-tune by EP (`epc.train`, whose metrics carry that `initial` entry); at
feedback gain 1 and auto. One thread; figures land in research/out/warm.jsonl.

    python research/warm_conversion.py --net mlp3 --gain 1 --gain auto --ep-epochs 5
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import OrderedDict

import torch
import torch.nn as nn

import epc

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")


def mlp(depth: int, width: int = 256, in_dim: int = 64) -> nn.Module:
    torch.manual_seed(0)
    layers, d = OrderedDict(), in_dim
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(d, width)
        layers[f"relu{i}"] = nn.ReLU()
        d = width
    layers[f"fc{depth + 1}"] = nn.Linear(d, 10)
    return nn.Sequential(layers)


def vgg(convs: int, width: int = 16) -> nn.Module:
    """(conv3x3-ReLU) x2 per block, max-pool 2 after each block (at most 2 pools on 8x8
    digits: a third block keeps 2x2), widths width, 2*width, 4*width."""
    torch.manual_seed(0)
    layers, c, hw = OrderedDict(), 1, 8
    for i in range(convs):
        w = width * (2 ** (i // 2))
        layers[f"conv{i + 1}"] = nn.Conv2d(c, w, 3, padding=1)
        layers[f"relu{i + 1}"] = nn.ReLU()
        c = w
        if i % 2 == 1 and hw > 2:
            layers[f"pool{i // 2 + 1}"] = nn.MaxPool2d(2)
            hw //= 2
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(c * hw * hw, 10)
    return nn.Sequential(layers)


NETS = {"mlp3": lambda: (mlp(3), (1, 64)), "mlp5": lambda: (mlp(5), (1, 64)),
        "fmlp3": lambda: (mlp(3, in_dim=784), (1, 784)),
        "fmlp5": lambda: (mlp(5, in_dim=784), (1, 784)),
        "vgg4": lambda: (vgg(4), (1, 1, 8, 8)), "vgg6": lambda: (vgg(6), (1, 1, 8, 8))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", required=True, choices=sorted(NETS))
    ap.add_argument("--gain", action="append", default=None)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--seed", type=int, default=0, help="shuffling seed of backprop and EP")
    ap.add_argument("--cost", default="mse", help="the compiled graph's label cost")
    ap.add_argument("--bp-epochs", type=int, default=20)
    ap.add_argument("--bp-lr", type=float, default=2e-3)
    ap.add_argument("--bp-loss", default="graph")
    ap.add_argument("--ep-epochs", type=int, default=5)
    ap.add_argument("--ep-lr", type=float, default=1e-4)
    ap.add_argument("--ep-wd", type=float, default=0.0)
    ap.add_argument("--cold", action="store_true", help="also EP from the initial weights "
                                                         "(default lr), same epochs")
    ap.add_argument("--train", default="{}", help="extra epc.train options (JSON)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    module, shape = NETS[a.net]()
    extra = json.loads(a.train)
    for gain in a.gain or ["1"]:
        g = epc.compile(module, example_input=torch.zeros(shape), feedback_gain=gain,
                        cost=a.cost)
        tag = f"{a.net}_g{gain}" + ("" if a.cost == "mse" else f"_{a.cost}") + \
            (f"_s{a.seed}" if a.seed else "")
        t0 = time.time()
        path = os.path.join(OUT, f"{tag}_bp.epc")
        bp = epc.backprop(g, data=a.data, epochs=a.bp_epochs, lr=a.bp_lr, loss=a.bp_loss,
                          output=path, seed=a.seed)
        row = {"net": a.net, "data": a.data, "gain": gain, "cost": a.cost, "seed": a.seed, "bp_epochs": a.bp_epochs, "bp_lr": a.bp_lr,
               "bp_loss": bp["loss"], "bp_test": bp["test_accuracy"], "converted": bp["converted"],
               "bp_seconds": time.time() - t0, "ep_epochs": a.ep_epochs, "ep_lr": a.ep_lr,
               "ep_wd": a.ep_wd, "train_extra": extra}
        print(f"{tag}: backprop {bp['test_accuracy']:.4f}, converted before EP "
              f"{bp['converted']['test_accuracy']:.4f} (unconverged "
              f"{bp['converted']['unconverged_fraction']:.2f}, sweeps "
              f"{bp['converted']['mean_sweeps']:.0f})", flush=True)
        if a.ep_epochs:
            def show(rec, tag=tag):
                print(f"  {tag} warm ep {rec['epoch']}: test {rec['test_accuracy']:.4f} train "
                      f"{rec['train_accuracy']:.4f} unconv {rec['unconverged_fraction']:.2f} "
                      f"free {rec['mean_free_sweeps']:.0f} {rec['seconds']:.1f}s", flush=True)
            m = epc.train(path, data=a.data, epochs=a.ep_epochs, lr=a.ep_lr, seed=a.seed,
                          weight_decay=a.ep_wd, on_epoch=show, divergence="warn", **extra)
            row["warm"] = {"initial": m["initial"]["test_accuracy"],
                           "initial_unconverged": m["initial"]["test_unconverged_fraction"],
                           "test": [h["test_accuracy"] for h in m["history"]],
                           "final": m["test_accuracy"], "best": m["best_test_accuracy"],
                           "seconds_per_epoch": m["seconds"] / max(m["epochs"], 1),
                           "free_sweeps": m["history"][-1]["mean_free_sweeps"]}
            print(f"{tag}: warm EP initial {row['warm']['initial']:.4f} -> "
                  f"{row['warm']['final']:.4f} after {a.ep_epochs} epochs", flush=True)
        if a.cold:
            m = epc.train(g, data=a.data, epochs=a.ep_epochs, divergence="warn", **extra)
            row["cold"] = {"initial": m["initial"]["test_accuracy"],
                           "test": [h["test_accuracy"] for h in m["history"]],
                           "final": m["test_accuracy"]}
            print(f"{tag}: cold EP (lr 5e-4) {row['cold']['final']:.4f} after "
                  f"{a.ep_epochs} epochs", flush=True)
        with open(os.path.join(OUT, "warm.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
