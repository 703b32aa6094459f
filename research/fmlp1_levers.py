"""Run from the repository root: `python research/fmlp1_levers.py clip:2` (or both,
readout-ce). Fashion-MNIST mlp1 (bench.depth's rung, seed 0, 15 epochs, full data): the levers the
per-layer-lr helper found one by one (clip:2 units, readout with CE), combined with
--layer-lrs auto (the default now)."""
import json, sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, ".")
from bench.depth import compile_net, load, _datasets
import epc
variant = sys.argv[1]
copts = {"clip:2": {"activation": "clip:2.0"}, "readout-ce": {"readout": True, "cost": "ce"},
         "both": {"activation": "clip:2.0", "readout": True, "cost": "ce"}}[variant]
d = load("fashion-mnist", (784,), 1, None, None)
g = compile_net("mlp1", "fashion-mnist", 0, **copts)
t = time.time()
m = epc.train(g, dataset=_datasets(d), epochs=15, seed=0, threads=1, divergence="warn")
out = {"variant": variant, "compile": copts, "test_accuracy": m["test_accuracy"],
       "best": m["best_test_accuracy"], "train_accuracy": m["train_accuracy"],
       "by_epoch": [h["test_accuracy"] for h in m["history"]],
       "s_per_epoch": [h["seconds"] for h in m["history"]], "recipe": m["recipe"],
       "wall": time.time() - t}
json.dump(out, open(f"research/out/fmlp1/{variant.replace(':', '')}.json", "w"), indent=1)
print(variant, out["test_accuracy"], out["best"])
