"""BP-only: backprop test accuracy and converted accuracy per (net, epochs, lr)."""
import sys, time, torch
import os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epc
from bench import depth as D
torch.set_num_threads(1)
net = sys.argv[1]
ch = D.LADDER[net][3]
src = f"research/out/w2/{net}.epc"
epc.save(D.compile_net(net, "digits", 0, target="torch"), src, target="torch")
for spec in sys.argv[2:]:
    e, lr = spec.split("@"); e, lr = int(e), float(lr)
    t = time.time()
    out = f"research/out/w2/{net}_bp{e}_{lr:g}.epc"
    bp = epc.backprop(src, data="digits", channels=ch if ch != 1 else None, epochs=e, lr=lr, seed=0, output=out)
    c = bp["converted"]
    print(f"{net} BP {e}@{lr:g}: {bp['test_accuracy']:.4f} converted {c['test_accuracy']:.4f} at cap {c['unconverged_fraction']:.3f} sweeps {c['mean_sweeps']:.1f} ({time.time()-t:.0f} s)", flush=True)
