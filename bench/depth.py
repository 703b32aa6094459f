"""The depth ladder: EP against backprop as networks get deeper (issue 21).

Every rung is a PyTorch module built here (seeded), compiled in-process by the real
pipeline (`epc.compile(module, example_input=...)`) and trained by EP through the API
(`epc.train`), once at the defaults and once per method toggled against them:

    feedback_gain   the other side of the compile default (gain 1 <-> auto)
    taps            intermediate error taps (`--taps auto`)
    decoupled_wd    the other form of weight decay (AdamW-style shrink <-> L2 term)
    warm            the other side of `--backprop-epochs auto` on the rung's graph: cold EP
                    where auto warm-starts (backprop epochs, then EP), a 30-epoch backprop
                    warm start where auto does not; its rows give the backprop and the
                    converted accuracy before the EP epochs
    layer_lrs       the other side of the per-layer learning rates (auto <-> none)
    implicit        (--implicit) the exact gradient at the free fixed point instead of
                    EP's estimate: tells EP's estimation error from the energy model's limit

Next to them stands backprop on the same module (bench/backprop.py: the feedforward form of
the compiled graph, the source model's activations, cross-entropy, Adam at each of --bp-lrs,
cosine), from the same initial weights, on the same data, epochs, batch size and seeds; its
figure is the best mean over the seeds among those learning rates (a generous reference).
A seed sets both the initial weights and the shuffling, for EP and backprop alike.

Per row: test accuracy (last epoch, mean over seeds), best test accuracy, train accuracy,
mean free / nudged sweeps a batch and seconds per epoch (last epoch), the fraction of free
phases that hit the sweep cap (last epoch, and the largest of any epoch), and whether the
net collapsed (one class predicted for every test sample). Timings move with machine load:
compare them only within one run.

    python -m bench.depth --json depth.json                       # the digits ladder
    python -m bench.depth --quick --json quick.json               # a few minutes
    python -m bench.depth --data fashion-mnist --train-samples 6000 --nets mlp1 mlp3
    python -m bench.depth --nets hop13w8 vgg6 res2 --toggles warm  # warm start vs cold EP
    python -m bench.depth --markdown depth.json                   # render a JSON as a table

--quick: mlp1, mlp5 and vgg2 on digits, 3 epochs, seed 0, backprop at lr 2e-3, the
feedback-gain and decoupled-decay toggles (tests/test_depth_bench.py runs a smaller cut).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import OrderedDict

import torch
import torch.nn as nn

from bench import write_json


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))


# --------------------------------------------------------------------------- the ladder
def mlp(hidden: int, n_in: int, width: int = 256, classes: int = 10) -> nn.Module:
    layers, c = OrderedDict(), n_in
    for i in range(hidden):
        layers[f"fc{i + 1}"] = nn.Linear(c, width)
        layers[f"relu{i + 1}"] = nn.ReLU()
        c = width
    layers[f"fc{hidden + 1}"] = nn.Linear(c, classes)
    return nn.Sequential(layers)


def vgg(nconv: int, in_ch: int, size: int, classes: int = 10) -> nn.Module:
    """nconv 3x3 convolutions (widths 32, 32, 64, 64, 128, 128), ReLU, a 2x2 max-pool after
    every second one, then a linear classifier on the flattened map."""
    widths = (32, 32, 64, 64, 128, 128)[:nconv]
    layers, c = OrderedDict(), in_ch
    for i, w in enumerate(widths):
        layers[f"conv{i + 1}"] = nn.Conv2d(c, w, 3, padding=1)
        layers[f"relu{i + 1}"] = nn.ReLU()
        if i % 2 == 1 and size >= 2:
            layers[f"pool{i + 1}"] = nn.MaxPool2d(2)
            size //= 2
        c = w
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(c * size * size, classes)
    return nn.Sequential(layers)


class IdentityBlock(nn.Module):
    """relu(conv(relu(conv(x))) + x): a basic block whose skip is the identity."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


class SmallResNet(nn.Module):
    """A stem convolution, `blocks` identity-skip blocks, a 2x2 max-pool and a linear
    classifier (no batch norm: the skips are what is measured)."""

    def __init__(self, in_ch: int, size: int, width: int = 16, blocks: int = 2,
                 classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1)
        self.blocks = nn.Sequential(*[IdentityBlock(width) for _ in range(blocks)])
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(width * (size // 2) ** 2, classes)

    def forward(self, x):
        h = self.blocks(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(h), 1))


def hopfield13(in_ch: int, size: int, width: int) -> nn.Module:
    """examples/build_examples.py's Hopfield-ResNet13 layout at widths w, 2w, 4w, 4w."""
    import build_examples as BE
    return BE.HopfieldResNet(widths=(width, 2 * width, 4 * width, 4 * width), in_ch=in_ch,
                             size=size)


def _shape(data: str, conv: bool, channels: int = 1) -> tuple:
    size = 8 if data == "digits" else 28
    return (channels, size, size) if conv else (size * size,)


# name -> (description, builder(data) -> module, conv?, input channels)
LADDER = OrderedDict([
    ("mlp1", ("MLP, 1 hidden layer of 256", lambda s: mlp(1, s[0]), False, 1)),
    ("mlp3", ("MLP, 3 hidden layers of 256", lambda s: mlp(3, s[0]), False, 1)),
    ("mlp5", ("MLP, 5 hidden layers of 256", lambda s: mlp(5, s[0]), False, 1)),
    ("mlp8", ("MLP, 8 hidden layers of 256", lambda s: mlp(8, s[0]), False, 1)),
    ("vgg2", ("VGG-style, 2 convs (32,32,M)", lambda s: vgg(2, s[0], s[1]), True, 1)),
    ("vgg4", ("VGG-style, 4 convs (32,32,M,64,64,M)", lambda s: vgg(4, s[0], s[1]), True, 1)),
    ("vgg6", ("VGG-style, 6 convs (32,32,M,64,64,M,128,128,M)",
              lambda s: vgg(6, s[0], s[1]), True, 1)),
    ("res2", ("ResNet: stem + 2 identity-skip blocks, width 16",
              lambda s: SmallResNet(s[0], s[1]), True, 1)),
    ("hop13w8", ("Hopfield-ResNet13 at widths 8,16,32,32 (3-channel input)",
                 lambda s: hopfield13(s[0], s[1], 8), True, 3)),
])

# the toggles: name -> (compile options, train options) against the defaults; a toggle
# that resolves to the defaults' own settings is not run twice. "feedback_gain" is set per
# rung (gain_toggle): the other side of what the default picked for that graph
def toggles(defaults: dict, implicit: bool) -> "OrderedDict[str, tuple[dict, dict]]":
    t = OrderedDict()
    t["feedback_gain"] = ({}, {})
    t["taps=auto"] = ({"taps": "auto"}, {})
    t["decoupled_wd=" + str(not defaults["decoupled_wd"]).lower()] = (
        {}, {"decoupled_wd": not defaults["decoupled_wd"]})
    t["warm"] = ({}, {})
    other = "none" if defaults.get("layer_lrs", "none") != "none" else "auto"
    t["layer_lrs=" + other] = ({}, {"layer_lrs": other})
    if implicit:
        t["gradient=implicit"] = ({}, {"gradient": "implicit"})
    return t


def warm_toggle(g) -> tuple[str, dict]:
    """The warm start against the default-compiled graph g: none where `--backprop-epochs
    auto` warm-starts it, auto's epoch count where it does not."""
    from epc.runtime.warm import AUTO_BACKPROP_EPOCHS, resolve_epochs
    if resolve_epochs("auto", g)[0]:
        return "warm=0", {"backprop_epochs": 0}
    return f"warm={AUTO_BACKPROP_EPOCHS}", {"backprop_epochs": AUTO_BACKPROP_EPOCHS}


def gain_toggle(g) -> tuple[str, dict]:
    """Feedback gain against the default-compiled graph g: symmetric feedback where the
    default regulated it, auto's ratio where the default left it symmetric."""
    from epc.compiler.passes.symmetrize import AUTO_RATIO
    if gain_summary(g)["regulated_couplings"]:
        return "feedback_gain=1", {"feedback_gain": 1.0}
    return f"feedback_gain={AUTO_RATIO:g}", {"feedback_gain": AUTO_RATIO}


def current_defaults() -> dict:
    """The compile and train defaults of the API (what a user gets with no flags)."""
    import inspect
    from epc import api
    c = inspect.signature(api.compile_result).parameters
    t = inspect.signature(api.train).parameters
    from epc.runtime.api import DEFAULT_LR
    return {"feedback_gain": c["feedback_gain"].default, "taps": c["taps"].default,
            "decoupled_wd": t["decoupled_wd"].default,
            "weight_decay": t["weight_decay"].default,
            "lr": t["lr"].default if t["lr"].default is not None else DEFAULT_LR,
            "backprop_epochs": t["backprop_epochs"].default,
            "layer_lrs": t["layer_lrs"].default,
            "optimizer": t["optimizer"].default, "batch_size": t["batch_size"].default}


QUICK = {"nets": ["mlp1", "mlp5", "vgg2"], "epochs": 3, "seeds": [0], "bp_lrs": [2e-3],
         "toggles": ["feedback_gain", "decoupled_wd"]}


# --------------------------------------------------------------------------- runs
def _subset(split, n: int | None):
    from epc.runtime.data import Split
    if n is None or n >= split.x.shape[0]:
        return split
    idx = torch.randperm(split.x.shape[0], generator=torch.Generator().manual_seed(1234))[:n]
    return Split(split.x[idx].contiguous(), split.y[idx].contiguous())


def load(data: str, shape: tuple, channels: int, train_samples, test_samples):
    """The data set shaped for the net (a fixed random subset when asked for)."""
    from epc.runtime.data import Data, load_dataset
    d = load_dataset(data, input_shape=shape, channels=channels if len(shape) == 3 else None)
    return Data(d.name, _subset(d.train, train_samples), _subset(d.test, test_samples),
                d.num_classes)


def build(name: str, data: str, seed: int):
    desc, make, conv, ch = LADDER[name]
    shape = _shape(data, conv, ch)
    torch.manual_seed(seed)
    m = make((shape[0],) if not conv else (shape[0], shape[1])).eval()
    return m, shape


def compile_net(name: str, data: str, seed: int, **options):
    import epc
    m, shape = build(name, data, seed)
    return epc.compile(m, example_input=torch.zeros(2, *shape), **options)


def gain_summary(g) -> dict:
    """The feedback recipe a compiled graph carries: its regulated couplings' gains."""
    gains = {c.name: float(c.feedback_gain) for c in g.couplings if c.feedback_gain != 1.0}
    return {"regulated_couplings": len(gains),
            "min_gain": min(gains.values()) if gains else 1.0,
            "max_gain": max(gains.values()) if gains else 1.0}


def _fingerprint(g) -> tuple:
    """What a toggle can change in a compiled graph: its states and couplings (names,
    roles, kinds) and every coupling's feedback and gain (the weights come from the seed)."""
    return (tuple((s.name, s.role) for s in g.states),
            tuple((c.name, c.src, c.dst, c.kind, c.feedback, float(c.feedback_gain))
                  for c in g.couplings))


def _datasets(d):
    from torch.utils.data import TensorDataset
    return TensorDataset(d.train.x, d.train.y), TensorDataset(d.test.x, d.test.y)


def ep_runs(name: str, d, data: str, epochs: int, seeds: list, copts: dict,
            topts: dict, log) -> dict:
    import epc
    runs = []
    for seed in seeds:
        g = compile_net(name, data, seed, **copts)
        t0 = time.perf_counter()
        m = epc.train(g, dataset=_datasets(d), epochs=epochs, seed=seed, threads=1,
                      divergence="warn", **topts)
        last = m["history"][-1]
        runs.append({
            "seed": seed, "test_accuracy": m["test_accuracy"],
            "best_test_accuracy": m["best_test_accuracy"],
            "train_accuracy": m["train_accuracy"],
            "free_sweeps": last["mean_free_sweeps"],
            "nudged_sweeps": last["mean_nudged_sweeps"],
            "seconds_per_epoch": last["seconds"],
            "at_cap": last["unconverged_fraction"],
            "at_cap_max": max(h["unconverged_fraction"] for h in m["history"]),
            "collapsed": bool(last.get("constant_prediction")),
            "divergence_warnings": m["divergence_warnings"],
            "accuracy_by_epoch": [h["test_accuracy"] for h in m["history"]],
            "config": m["config"], "recipe": m.get("recipe"),
            # the free phase before any step; with a warm start the backprop epochs' figures
            # and the converted network's free phase before any EP step
            "initial": m["initial"]["test_accuracy"] if m.get("initial") else None,
            **(_warm_figures(m) if m.get("warm_start") else {}),
            "compiled": gain_summary(g), "wall_seconds": time.perf_counter() - t0})
        log(f"depth {name} EP {copts or ''}{topts or ''} seed {seed}: test "
            f"{m['test_accuracy']:.4f} train {m['train_accuracy']:.4f} free sweeps "
            f"{last['mean_free_sweeps']:.1f} at cap {last['unconverged_fraction']:.3f} "
            f"{last['seconds']:.1f} s/epoch")
    return _mean(runs) | {"compile_options": copts, "train_options": topts, "runs": runs}


def _warm_figures(m: dict) -> dict:
    w = m["warm_start"]
    return {"backprop_epochs": w["epochs"], "backprop_test_accuracy": w["test_accuracy"],
            "backprop_seconds_per_epoch": w["history"][-1]["seconds"] if w["history"] else 0.0,
            "converted": m["converted"]["test_accuracy"]}


def _mean(runs: list) -> dict:
    out = {}
    for k in ("test_accuracy", "best_test_accuracy", "train_accuracy", "free_sweeps",
              "nudged_sweeps", "seconds_per_epoch", "at_cap", "at_cap_max"):
        out[k] = sum(r[k] for r in runs) / len(runs)
    out["collapsed"] = sum(r["collapsed"] for r in runs)
    if all("converted" in r for r in runs):
        for k in ("backprop_test_accuracy", "converted", "backprop_seconds_per_epoch"):
            out[k] = sum(r[k] for r in runs) / len(runs)
        out["backprop_epochs"] = runs[0]["backprop_epochs"]
    return out


def bp_runs(name: str, d, data: str, epochs: int, seeds: list, lrs: list, log) -> dict:
    """Backprop on the feedforward form of the default-compiled graph, from the same initial
    weights (bench.backprop.train_backprop), best mean over seeds among `lrs`."""
    from bench.backprop import train_backprop
    by_lr = {}
    for lr in lrs:
        rs = []
        for seed in seeds:
            g = compile_net(name, data, seed)
            r = train_backprop(g, d, epochs=epochs, seed=seed, lr=lr, weight_decay=0.0)
            r.pop("test_errors")
            r["seconds_per_epoch"] = r["seconds"] / epochs
            rs.append(r)
        by_lr[lr] = rs
        log(f"depth {name} backprop lr {lr:g}: test "
            + ", ".join(f"{r['test_accuracy']:.4f}" for r in rs))
    mean = {lr: sum(r["test_accuracy"] for r in rs) / len(rs) for lr, rs in by_lr.items()}
    best = max(mean, key=mean.get)
    rs = by_lr[best]
    return {"test_accuracy": mean[best], "lr": best,
            "train_accuracy": sum(r["train_accuracy"] for r in rs) / len(rs),
            "seconds_per_epoch": sum(r["seconds_per_epoch"] for r in rs) / len(rs),
            "mean_by_lr": {str(k): v for k, v in mean.items()},
            "optimizer": "adam, no weight decay, cosine, cross-entropy, source activations",
            "runs": [r for rr in by_lr.values() for r in rr]}


def run_ladder(nets, data: str = "digits", epochs: int = 10, seeds=(0,), bp_lrs=(1e-3, 5e-3),
               toggle_names=None, implicit: bool = False, train_samples=None,
               test_samples=None, quick: bool = False, log=print, on_net=None) -> dict:
    torch.set_num_threads(1)
    defaults = current_defaults()
    out = {"bench": "depth", "data": data, "epochs": epochs, "seeds": list(seeds),
           "quick": quick, "train_samples": train_samples, "test_samples": test_samples,
           "defaults": defaults, "backprop_lrs": list(bp_lrs),
           "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": 1,
                       "python": platform.python_version()},
           "nets": OrderedDict()}
    ts = toggles(defaults, implicit)
    if toggle_names is not None:
        ts = OrderedDict((k, v) for k, v in ts.items()
                         if k.split("=")[0] in toggle_names)
    for name in nets:
        try:
            out["nets"][name] = _rung(name, data, epochs, list(seeds), bp_lrs, ts,
                                      train_samples, test_samples, log)
        except Exception as e:        # one rung's failure is a result, not the end of the run
            out["nets"][name] = {"description": LADDER[name][0],
                                 "error": f"{type(e).__name__}: {e}"}
            log(f"depth {name}: {type(e).__name__}: {e}")
        if on_net is not None:
            on_net(out)
    return out


def _rung(name, data, epochs, seeds, bp_lrs, ts, train_samples, test_samples, log) -> dict:
    """One rung: EP at the defaults and per toggle, then backprop."""
    desc, _, conv, ch = LADDER[name]
    shape = _shape(data, conv, ch)
    d = load(data, shape, ch, train_samples, test_samples)
    g0 = compile_net(name, data, seeds[0])
    m0, _ = build(name, data, seeds[0])
    row = {"description": desc, "input_shape": list(shape),
           "parameters": sum(p.numel() for p in m0.parameters()),
           "hidden_states": sum(s.role == "hidden" for s in g0.states),
           "ep": OrderedDict()}
    row["ep"]["defaults"] = ep_runs(name, d, data, epochs, list(seeds), {}, {}, log)
    for tname, (copts, topts) in ts.items():
        if tname == "feedback_gain":
            tname, copts = gain_toggle(g0)
        if tname == "warm":
            tname, topts = warm_toggle(g0)
        if not topts and _fingerprint(compile_net(name, data, seeds[0], **copts)) == \
                _fingerprint(g0):
            # the toggle compiles to the very graph the defaults do (e.g. feedback gain
            # auto on one hidden layer is symmetric feedback): the same run, not repeated
            row["ep"][tname] = dict(row["ep"]["defaults"], compile_options=copts,
                                    same_as="defaults")
            continue
        row["ep"][tname] = ep_runs(name, d, data, epochs, list(seeds), copts, topts, log)
    row["backprop"] = bp_runs(name, d, data, epochs, list(seeds), list(bp_lrs), log)
    row["ep_minus_backprop"] = (row["ep"]["defaults"]["test_accuracy"]
                                - row["backprop"]["test_accuracy"])
    return row


# --------------------------------------------------------------------------- rendering
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def markdown(res: dict) -> str:
    """One table: a row per net and EP variant, backprop beside the defaults' row."""
    head = ("| net | EP variant | EP test % | EP train % | BP test % | EP - BP | free sweeps "
            "| nudged sweeps | s/epoch EP | s/epoch BP | free phases at cap | collapsed |")
    lines = [f"Depth ladder on {res['data']}"
             + (f" ({res['train_samples']} training samples)" if res.get("train_samples")
                else "")
             + f", {res['epochs']} epochs, seeds {', '.join(map(str, res['seeds']))}"
             + (" (--quick)" if res.get("quick") else "") + ". Defaults: feedback gain "
             f"{res['defaults']['feedback_gain']}, decoupled weight decay "
             f"{res['defaults']['decoupled_wd']} (wd {res['defaults']['weight_decay']:g})"
             + (f", backprop warm start {res['defaults']['backprop_epochs']}"
                if "backprop_epochs" in res["defaults"] else "")
             + (f", layer learning rates {res['defaults']['layer_lrs']}"
                if "layer_lrs" in res["defaults"] else "") + ". "
             f"Backprop: best lr of {', '.join(f'{x:g}' for x in res['backprop_lrs'])}.",
             "", head, "|" + "---|" * 12]
    if any("converted" in r for row in res["nets"].values() if "ep" in row
           for r in row["ep"].values()):
        lines[1:1] = ["", "A row after backprop epochs (a warm start) ran them before its EP "
                      "epochs; its own backprop and converted accuracies are in the variant "
                      "cell. The BP column is backprop for the EP epochs alone, from the "
                      "initial weights."]
    if res.get("train_samples") or res.get("test_samples"):
        lines[0] = lines[0].replace(" training samples)", f" training samples, "
                                    f"{res.get('test_samples') or 'all'} test samples)")
    for name, row in res["nets"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} |" + " |" * 10)
            continue
        bp = row["backprop"]
        for i, (v, r) in enumerate(row["ep"].items()):
            warm = (f" (after {r['backprop_epochs']} backprop epochs: BP "
                    f"{_pct(r['backprop_test_accuracy'])}, converted {_pct(r['converted'])}, "
                    f"{r['backprop_seconds_per_epoch']:.2f} s/BP epoch)"
                    if "converted" in r else "")
            lines.append(
                f"| {name if i == 0 else ''} | {v}{' (= defaults)' if r.get('same_as') else ''}{warm} | {_pct(r['test_accuracy'])} | "
                f"{_pct(r['train_accuracy'])} | {_pct(bp['test_accuracy']) if i == 0 else ''} | "
                f"{100 * (r['test_accuracy'] - bp['test_accuracy']):+.2f} | "
                f"{r['free_sweeps']:.1f} | {r['nudged_sweeps']:.1f} | "
                f"{r['seconds_per_epoch']:.2f} | "
                f"{bp['seconds_per_epoch']:.2f} | {r['at_cap']:.3f} (max {r['at_cap_max']:.3f}) | "
                f"{r['collapsed']}/{len(r['runs'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.depth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write results here (rewritten after every net)")
    ap.add_argument("--markdown", nargs="+", default=None, metavar="JSON",
                    help="print the table of each results JSON and exit")
    ap.add_argument("--quick", action="store_true",
                    help=f"the quick subset: {QUICK['nets']}, {QUICK['epochs']} epochs, seed 0")
    ap.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    ap.add_argument("--nets", nargs="+", choices=list(LADDER), default=None,
                    help="rungs to run (default: all)")
    ap.add_argument("--epochs", type=int, default=None, help="default 10 (quick: 3)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0")
    ap.add_argument("--bp-lrs", type=float, nargs="+", default=None,
                    help="backprop learning rates (default 1e-3 5e-3); best mean is reported")
    ap.add_argument("--toggles", nargs="*", default=None,
                    choices=["feedback_gain", "taps", "decoupled_wd", "warm", "layer_lrs",
                             "gradient"],
                    help="methods toggled against the defaults (default: all)")
    ap.add_argument("--implicit", action="store_true",
                    help="also train with the exact gradient (--gradient implicit)")
    ap.add_argument("--train-samples", type=int, default=None,
                    help="a fixed random subset of the training split")
    ap.add_argument("--test-samples", type=int, default=None)
    a = ap.parse_args(argv)
    if a.markdown:
        for i, path in enumerate(a.markdown):
            with open(path) as f:
                sys.stdout.write(("\n" if i else "") + markdown(json.load(f)))
        return 0
    q = QUICK if a.quick else {}
    nets = a.nets or q.get("nets") or list(LADDER)
    epochs = a.epochs or q.get("epochs", 10)
    seeds = a.seeds or q.get("seeds", [0])
    lrs = a.bp_lrs or q.get("bp_lrs", [1e-3, 5e-3])
    tog = a.toggles if a.toggles is not None else q.get("toggles")
    if a.implicit:
        tog = (tog or ["feedback_gain", "taps", "decoupled_wd", "warm", "layer_lrs"]
               ) + ["gradient"]

    def save(res):
        if a.json:
            write_json(a.json, res)

    res = run_ladder(nets, a.data, epochs, seeds, lrs, tog, a.implicit, a.train_samples,
                     a.test_samples, a.quick, log=lambda m: print(m, flush=True), on_net=save)
    save(res)
    sys.stdout.write(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
