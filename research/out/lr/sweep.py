"""Ad-hoc sweep: Fashion MLP EP variants (API), one thread. usage: sweep.py NET EPOCHS 'json-list-of-[copts,topts]'"""
import json, sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, '/work/wt/i21-lr')
from bench import depth as D
import epc
net, epochs, variants = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
data = sys.argv[4] if len(sys.argv) > 4 else "fashion-mnist"
desc, make, conv, ch = D.LADDER[net]
shape = D._shape(data, conv, ch)
d = D.load(data, shape, ch, None, None)
for copts, topts in variants:
    g = D.compile_net(net, data, 0, **copts)
    t0 = time.perf_counter()
    m = epc.train(g, dataset=D._datasets(d), epochs=epochs, seed=0, threads=1, divergence="warn", **topts)
    h = m["history"]
    print(json.dumps({"net": net, "copts": copts, "topts": topts, "test": m["test_accuracy"],
        "best": m["best_test_accuracy"], "train": m["train_accuracy"],
        "by_epoch": [round(x["test_accuracy"], 4) for x in h],
        "s_epoch": round(h[-1]["seconds"], 2), "free": round(h[-1]["mean_free_sweeps"], 1),
        "nudged": round(h[-1]["mean_nudged_sweeps"], 1), "wall": round(time.perf_counter() - t0, 1)}), flush=True)
