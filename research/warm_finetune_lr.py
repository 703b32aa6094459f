"""EP fine-tuning lr after `epc backprop` (two-command warm conversion) on a ladder rung.
python research/warm_finetune_lr.py NET BP_EPOCHS BP_LR EP_EPOCHS LR [LR ...]; rows in research/out/w2/exp*.log"""
import sys, time, os, json, torch
import os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epc
from bench import depth as D
torch.set_num_threads(1)
net, bpe, bplr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ep_epochs = int(sys.argv[4]); lrs = [float(x) for x in sys.argv[5:]]
ch = D.LADDER[net][3]
dd = "research/out/w2"
src, bp_out = f"{dd}/{net}.epc", f"{dd}/{net}_bp{bpe}_{bplr:g}.epc"
epc.save(D.compile_net(net, "digits", 0, target="torch"), src, target="torch")
t = time.time()
bp = epc.backprop(src, data="digits", channels=ch if ch != 1 else None, epochs=bpe, lr=bplr, seed=0, output=bp_out)
print(f"{net} backprop {bpe}@{bplr:g}: {bp['test_accuracy']:.4f}, converted {bp['converted']['test_accuracy']:.4f} sweeps {bp['converted']['mean_sweeps']:.1f} ({(time.time()-t)/bpe:.1f} s/epoch)", flush=True)
for lr in lrs:
    t = time.time()
    m = epc.train(bp_out, data="digits", channels=ch if ch != 1 else None, epochs=ep_epochs, lr=lr, seed=0)
    print(f"{net} EP lr {lr:g}: initial {m['initial']['test_accuracy']:.4f} per epoch", [round(h["test_accuracy"], 4) for h in m["history"]],
          f"{m['history'][-1]['seconds']:.1f} s/epoch, free sweeps {m['history'][-1]['mean_free_sweeps']:.1f}", flush=True)
