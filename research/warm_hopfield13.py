"""Warm conversion of the depth ladder's Hopfield-ResNet13 (widths 8-16-32-32) on digits.

Cold EP at the defaults does not learn this net (bench.depth: 6.94% after 10 epochs). Here
the compiled graph is trained by backprop first (`epc backprop`, the graph's own cost), then
fine-tuned by EP at the defaults (feedback gain auto: 0.1 a level on this 8-hidden-state net).

    python research/warm_hopfield13.py [--bp-epochs 30 --bp-lr 5e-3 --ep-epochs 10 --ep-lr 1e-4]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epc  # noqa: E402
from bench import depth as D  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bp-epochs", type=int, default=30)
    ap.add_argument("--bp-lr", type=float, default=5e-3)
    ap.add_argument("--ep-epochs", type=int, default=10)
    ap.add_argument("--ep-lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=".")
    a = ap.parse_args()
    torch.set_num_threads(1)
    src, bp_out = os.path.join(a.dir, "hop13w8.epc"), os.path.join(a.dir, "hop13w8_bp.epc")
    epc.save(D.compile_net("hop13w8", "digits", a.seed, target="torch"), src, target="torch")
    t = time.time()
    bp = epc.backprop(src, data="digits", channels=3, epochs=a.bp_epochs, lr=a.bp_lr,
                      seed=a.seed, output=bp_out)
    print(f"backprop {bp['test_accuracy']:.4f}, converted {bp['converted']['test_accuracy']:.4f}"
          f" ({time.time() - t:.0f} s)")
    t = time.time()
    m = epc.train(bp_out, data="digits", channels=3, epochs=a.ep_epochs, lr=a.ep_lr,
                  seed=a.seed)
    print("EP per epoch", [round(h["test_accuracy"], 4) for h in m["history"]],
          f"({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
