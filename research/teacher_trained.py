"""A BP-trained teacher vs `--teacher source` on an untrained source (issue 21, item 2):
the same deep net compiled at --feedback-gain auto with no teacher, with its own untrained
source as teacher, and with the net trained by `epc backprop --onnx` as teacher; EP from
the same initial weights, same epochs. Rows land in research/out/teacher.jsonl.

    python research/teacher_trained.py --net mlp5 --epochs 10
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import epc
from warm_conversion import NETS, OUT


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", required=True, choices=sorted(NETS))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--bp-epochs", type=int, default=20)
    ap.add_argument("--bp-loss", default="ce")
    ap.add_argument("--gain", default="auto")
    ap.add_argument("--train", default="{}")
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    module, shape = NETS[a.net]()
    x = torch.zeros(shape)
    extra = json.loads(a.train)
    plain = epc.compile(module, example_input=x, feedback_gain=a.gain)
    onnx = os.path.join(OUT, f"{a.net}_teacher.onnx")
    bp = epc.backprop(plain, epochs=a.bp_epochs, loss=a.bp_loss, onnx=onnx)
    print(f"{a.net}: teacher by backprop ({a.bp_loss}) {bp['test_accuracy']:.4f}", flush=True)
    runs = {"none": plain,
            "source (untrained)": epc.compile(module, example_input=x, feedback_gain=a.gain,
                                              teacher="source"),
            "BP-trained ONNX": epc.compile(module, example_input=x, feedback_gain=a.gain,
                                           teacher=onnx)}
    row = {"net": a.net, "gain": a.gain, "epochs": a.epochs, "teacher_bp": bp["test_accuracy"],
           "bp_loss": a.bp_loss, "train_extra": extra, "runs": {}}
    for name, g in runs.items():
        m = epc.train(g, epochs=a.epochs, divergence="warn", **extra)
        h = [r["test_accuracy"] for r in m["history"]]
        row["runs"][name] = {"final": m["test_accuracy"], "best": max(h), "test": h,
                             "seconds_per_epoch": m["seconds"] / max(m["epochs"], 1)}
        print(f"{a.net} teacher {name}: EP {m['test_accuracy']:.4f} (best {max(h):.4f}) "
              f"after {a.epochs} epochs, {row['runs'][name]['seconds_per_epoch']:.1f}s/epoch",
              flush=True)
    with open(os.path.join(OUT, "teacher.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
