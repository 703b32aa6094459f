import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, '/work/wt/i21-lr')
from bench import depth as D
from bench.backprop import train_backprop
net, epochs = sys.argv[1], int(sys.argv[2])
variants = json.loads(sys.argv[3])
data = "fashion-mnist"
desc, make, conv, ch = D.LADDER[net]
shape = D._shape(data, conv, ch)
d = D.load(data, shape, ch, None, None)
for v in variants:
    g = D.compile_net(net, data, 0)
    r = train_backprop(g, d, epochs=epochs, seed=0, **v)
    r.pop("test_errors")
    print(json.dumps({"net": net, **v, **r}), flush=True)
