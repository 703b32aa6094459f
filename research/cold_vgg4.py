import sys, json, torch
sys.path.insert(0, ".")
torch.set_num_threads(1)
import epc
from warm_conversion import NETS
module, shape = NETS["vgg4"]()
for gain in ("auto", "1"):
    g = epc.compile(module, example_input=torch.zeros(shape), feedback_gain=gain)
    m = epc.train(g, epochs=5, divergence="warn")
    print("vgg4 cold gain", gain, [round(h["test_accuracy"], 4) for h in m["history"]],
          "s/epoch", round(m["seconds"] / 5, 1), flush=True)
