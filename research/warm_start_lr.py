"""`epc.train` with a backprop warm start (the new flow) on a ladder rung, per EP lr.
python warmtrain.py NET EP_EPOCHS BP_EPOCHS BP_LR LR [LR ...]   (LR 'rule' = the default rule)"""
import sys, time, json, torch
import os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epc
from bench import depth as D
torch.set_num_threads(1)
net, epochs, bpe, bplr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ch = D.LADDER[net][3]
for lr in sys.argv[5:]:
    g = D.compile_net(net, "digits", 0)
    t = time.time()
    m = epc.train(g, data="digits", channels=ch if ch != 1 else None, epochs=epochs, seed=0,
                  backprop_epochs=bpe, backprop_lr=bplr, lr=None if lr == "rule" else float(lr),
                  divergence="warn")
    w = m.get("warm_start")
    row = {"net": net, "ep_epochs": epochs, "bp_epochs": bpe, "bp_lr": bplr, "lr": m["config"]["lr"],
           "initial": m["initial"]["test_accuracy"], "bp": w and w["test_accuracy"],
           "converted": m.get("converted", {}).get("test_accuracy"),
           "ep": [round(h["test_accuracy"], 4) for h in m["history"]],
           "ep_s_per_epoch": m["history"][-1]["seconds"], "free_sweeps": m["history"][-1]["mean_free_sweeps"],
           "bp_s_per_epoch": w and w["history"][-1]["seconds"], "wall": time.time() - t}
    print(json.dumps(row), flush=True)
