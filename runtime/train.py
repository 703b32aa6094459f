"""EP training and evaluation loops, checkpoints and exact resume.

One training step on a batch: settle free (beta = 0) from zeros (or from the sample's last
free fixed point with warm start), settle at +beta and at -beta from the free fixed point
(symmetric nudging; one-sided settles only +beta and uses the free point), form the EP
estimate (runtime/learn.py) and apply the optimiser. With `gradient='implicit'` the step
instead takes the exact gradient of the loss at the free fixed point (recurrent backprop,
runtime/gradcheck.py): a slower reference that trains the same energy model, to tell EP's
estimation error from what the model itself can learn. Predictions are the argmax of the
output state at the free fixed point. With `augment` (runtime/augment.py) each training
batch is shifted / mirrored as it is drawn; evaluation sees the data as it is.

Runs are reproducible: the epoch's shuffle comes from a generator seeded with
(seed, epoch), the optimiser state is a set of named arrays, and a checkpoint
(DIR/last.epc, a normal bundle with target 'torch') stores weights, optimiser state,
warm-start buffers, the epoch and the history, so `resume` continues exactly where the
run stopped.

Data parallel (a `DataParallel` context, runtime/distributed.py): every process draws the
same global batches, settles its shard of each, and the step's estimates and counts are
summed over the processes before the (identical) update; the epoch records and the
evaluation are the whole batch's and the whole split's, the same in every process. A
checkpoint records the number of processes, and resuming with another is refused.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from epc.compiler import flags
from epc.compiler.bundle import Bundle, read_bundle, write_bundle
from epc.compiler.errors import EpcError

from . import deviation, layer_lrs
from .augment import Augment, epoch_generator
from .data import Data
from .distributed import DataParallel, every_process
from .engine import Engine, schedule_mode
from .gradcheck import implicit_gradient
from .learn import NonFiniteGradient, Optimizer, ep_gradient, spike_train_gradient
from .spikes import SpikeCounts, generator, mix_seed

# the implicit gradient's adjoint iteration in training: it converges geometrically at the
# rate of the sweep's contraction around the fixed point; a sample whose iteration diverges
# or has not converged after IMPLICIT_ITERS (its free state is not a stable fixed point) is
# left out of that step's loss, and a step with no sample left applies nothing
IMPLICIT_ITERS = 500
IMPLICIT_TOL = 1e-6


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "adam"          # adam | sgd
    lr: float = 5e-4                 # tuned on digits: docs/findings.md
    momentum: float = 0.9
    weight_decay: float = 1e-3
    decoupled_wd: bool = True        # weight decay as a shrink (AdamW), not an L2 term
    cosine: bool = True
    clip: float | None = None        # gradient-norm clipping threshold
    beta: float = 0.2
    nudge: str = "symmetric"         # symmetric | one-sided
    nudge_form: str = "states"       # states | deviation (runtime/deviation.py)
    seed: int = 0
    mode: str | None = None          # None: the schedule's; 'colour' | 'sync'
    max_sweeps: int | None = None    # None: the schedule's
    nudge_sweeps: int | None = None
    tol: float | None = None
    warm_start: bool = False
    freeze_pool: bool = True         # nudged phases keep the free phase's max-pool winners
    pool_freeze: int | None = 20     # freeze max-pool winners after this many free sweeps
    eval_batch_size: int = 256
    augment: str | None = None       # training-set augmentation, e.g. 'crop:4,flip'
    gradient: str = "ep"             # ep | implicit (the exact gradient, a reference)
    divergence: str = "stop"         # stop | warn: what the divergence watch does
    precision: str = "fp32"          # the settle loop's dtype: fp32 | bf16 | fp16
    estimate: str = "rates"          # bernoulli graphs: EP from the nudged phases' rate
                                     # estimates, or from their spike trains ('spikes')
    backprop_epochs: int = 0         # backprop epochs of the feedforward form before the EP
                                     # epochs (a warm start, runtime/warm.py)
    backprop_lr: float = 2e-3        # their peak Adam learning rate
    layer_lrs: str = "auto"          # per-level factors on lr: none | auto | '1,0.25'
                                     # (runtime/layer_lrs.py)

    def check(self) -> "TrainConfig":
        """Refuse bad values, each by its flag's one rule (compiler/flags.py)."""
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size),
                            ("optimizer", self.optimizer), ("lr", self.lr),
                            ("momentum", self.momentum), ("weight_decay", self.weight_decay),
                            ("clip", self.clip), ("beta", self.beta), ("nudge", self.nudge),
                            ("seed", self.seed), ("schedule", self.mode),
                            ("max_sweeps", self.max_sweeps),
                            ("nudge_sweeps", self.nudge_sweeps), ("tol", self.tol),
                            ("gradient", self.gradient), ("divergence", self.divergence),
                            ("nudge_form", self.nudge_form), ("precision", self.precision),
                            ("estimate", self.estimate),
                            ("backprop_epochs", self.backprop_epochs),
                            ("backprop_lr", self.backprop_lr)):
            if name == "beta" and value is None:
                raise EpcError(f"bad --beta None: must be {flags.RULES['beta'].what}")
            flags.check(name, value)
        if self.backprop_epochs == "auto":
            raise EpcError("--backprop-epochs auto is resolved per graph (runtime/warm.py "
                           "resolve_epochs) before the run's configuration is checked")
        if self.nudge_form == "deviation" and self.nudge != "symmetric":
            raise EpcError("--nudge-form deviation settles the symmetric pair; it needs "
                           "--nudge symmetric")
        if self.nudge_form == "deviation" and self.precision not in (None, "fp32"):
            raise EpcError(f"--precision {self.precision} settles the engine's phases in 16 "
                           f"bits; --nudge-form deviation settles its nudged phases in its "
                           f"own float32 loop: use --nudge-form states, or --precision fp32")
        self.layer_lrs = flags.check("layer_lrs", self.layer_lrs)
        self.mode = schedule_mode(self.mode)
        self.precision = self.precision or "fp32"
        aug = Augment.parse(self.augment)
        self.augment = aug.spec() if aug else None
        return self

    # fields whose change makes a checkpoint's continuation differ from the original run
    RESUME_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                   "cosine", "clip", "beta", "nudge", "seed", "mode", "max_sweeps",
                   "nudge_sweeps", "tol", "warm_start", "freeze_pool", "pool_freeze",
                   "augment", "gradient", "decoupled_wd", "nudge_form", "precision",
                   "estimate", "backprop_epochs", "backprop_lr", "layer_lrs")
    # what a checkpoint written before a key existed ran with
    RESUME_DEFAULTS = {"augment": None, "gradient": "ep", "decoupled_wd": False,
                       "nudge_form": "states", "precision": "fp32", "estimate": "rates",
                       "backprop_epochs": 0, "backprop_lr": 2e-3, "layer_lrs": "none"}

    def check_engine(self, eng: Engine) -> None:
        """The settings that apply to one kind of network only, against `eng`'s: a
        bernoulli network runs exactly its time steps (no sweep caps, no tolerance), and
        the spike-train estimate needs spikes."""
        if eng.stochastic:
            flag = next((f for k, f in (("max_sweeps", "--max-sweeps"),
                                        ("nudge_sweeps", "--nudge-sweeps"), ("tol", "--tol"))
                         if getattr(self, k) is not None), None)
            if flag:
                raise EpcError(f"{flag} applies to rate neurons (a sweep cap or tolerance); "
                               f"this network's bernoulli neurons run each phase for exactly "
                               f"its time steps (set with epc compile MODEL --time-steps N "
                               f"--nudge-time-steps M)")
            if self.gradient == "implicit":
                raise EpcError("--gradient implicit needs a deterministic fixed point; this "
                               "network has bernoulli neurons (compile it with --neuron rate "
                               "for the reference)")
            if self.nudge_form != "states":
                raise EpcError(f"--nudge-form {self.nudge_form} settles deterministic "
                               f"deviations from the free state; this network has bernoulli "
                               f"neurons (use --nudge-form states)")
            if self.estimate == "spikes" and self.nudge != "symmetric":
                raise EpcError("--estimate spikes compares the spike trains of the +beta and "
                               "-beta phases; it needs --nudge symmetric")
        elif self.estimate != "rates":
            raise EpcError(f"--estimate {self.estimate} applies to bernoulli neurons; this "
                           f"network's neurons are rate")


DEAD_SPAN = 1e-6   # a state whose every unit stays within this over a split is dead
COST_KEYS = ("multiply_adds_per_inference", "time_steps", "spike_rate",
             "synaptic_events_per_inference")
EVAL_STREAM = 0x5EED_E7A1   # evaluation's generators: (seed, this, batch) - never a step's


class Diverged(EpcError):
    """Training (or evaluation) that left the numbers behind; `record` is the epoch record
    of the epoch that failed the divergence watch, if that is what stopped it."""

    def __init__(self, message: str, record: dict | None = None):
        super().__init__(message)
        self.record = record


# The divergence watch, after every epoch (what --divergence stop|warn acts on):
# * the loss is NaN or Inf, or the epoch's train loss exceeds EXPLODE_FACTOR times the loss
#   of the run's first batch (the network as it started: a run whose loss grows tenfold
#   past that is not learning, e.g. --lr 1e3; after a warm start, the larger of that and
#   the test loss before the backprop epochs);
# * or, after a healthy start (a test accuracy at least HEALTHY of the way from chance to
#   100%), the test accuracy falls back to chance (within CHANCE_MARGIN of the way):
#   chance is the share of the most frequent class among the test labels.
EXPLODE_FACTOR = 10.0
HEALTHY = 0.5
CHANCE_MARGIN = 0.05


def chance_level(labels) -> float:
    """The accuracy of always predicting the most frequent class."""
    y = np.asarray(labels).reshape(-1)
    return float(np.bincount(y).max() / len(y)) if len(y) else 0.0


def accuracy_collapse(history: list[dict], chance: float) -> str | None:
    """Why the last epoch's test accuracy counts as fallen to chance after a healthy start
    (earlier epochs of `history`), or None."""
    if len(history) < 2:
        return None
    last = history[-1]
    best = max(history[:-1], key=lambda h: h["test_accuracy"])
    if best["test_accuracy"] >= chance + HEALTHY * (1 - chance) and \
            last["test_accuracy"] <= chance + CHANCE_MARGIN * (1 - chance):
        return (f"test accuracy fell to {last['test_accuracy']:.2%}, chance level "
                f"({chance:.2%} for the most frequent class), after "
                f"{best['test_accuracy']:.2%} in epoch {best['epoch']}")
    return None


def divergence(history: list[dict], chance: float) -> str | None:
    """What the divergence watch finds wrong with the last epoch of `history`, or None."""
    last = history[-1]
    for k in ("train_loss", "test_loss"):
        if not math.isfinite(last.get(k, 0.0)):
            return f"the {k.replace('_', ' ')} is {last[k]}"
    start, what = history[0].get("initial_loss"), "its first batch"
    # a warm-started run's first batch is already trained (HR13: 0.004, where a tenfold
    # rise is still a working net): the network before its backprop epochs is the start
    cold = history[0].get("cold_loss")
    if start is not None and cold is not None and math.isfinite(cold) and cold > start:
        start, what = cold, "the network before its warm start"
    if start is not None and math.isfinite(start) and \
            last["train_loss"] > EXPLODE_FACTOR * max(start, 1e-12):
        return (f"train loss {last['train_loss']:.4g} is over {EXPLODE_FACTOR:g}x the loss "
                f"of {what} ({start:.4g})")
    return accuracy_collapse(history, chance)


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


@torch.no_grad()
def _widen_ranges(lo: dict, hi: dict, states: dict, watch) -> None:
    """Fold a batch's per-unit minima and maxima of the watched states into lo/hi (the
    evaluation's dead-state check reads them)."""
    for j in watch:
        a, b = states[j].amin(0), states[j].amax(0)
        lo[j] = torch.minimum(lo[j], a) if j in lo else a
        hi[j] = torch.maximum(hi[j], b) if j in hi else b


def evaluate(eng: Engine, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
             max_sweeps: int | None = None, tol: float | None = None,
             mode: str | None = None, predictions: bool = False,
             dp: DataParallel | None = None, seed: int = 0) -> dict:
    """Free-phase accuracy, loss and convergence over a split (and, with `predictions`,
    the predicted class of every sample, as a numpy array).

    Cost of one inference (a free phase): `multiply_adds_per_inference`, the
    multiply-accumulates of couplings read from inputs (once) and from rate states (every
    sweep, `mean_sweeps` of them); for a bernoulli network also `time_steps`,
    `spike_rate` (the mean fraction of bernoulli units firing per time step) and
    `synaptic_events_per_inference` (spikes delivered over synapses: additions, see
    runtime/spikes.py). Its spikes draw from one generator per batch, seeded from
    (`seed`, the batch's index): a split evaluates the same way every time.

    `dead_states`: the hidden and output states none of whose units varies by more than
    DEAD_SPAN across the samples (empty for fewer than two samples). Such a state carries
    nothing forward and passes no EP signal back (e.g. clipped at 0 everywhere, or
    saturated, after too high an lr).

    `constant_prediction`: the class every sample was predicted as, when the labels hold
    at least two classes but the predictions one (else None): the network's output no
    longer depends on its input, even where its states still vary a little (a collapsed
    deep net keeps a spread of ~1e-5, above DEAD_SPAN).

    With `dp`, each batch is split over the processes (runtime/distributed.py) and the
    result, the whole split's, is the same in every process.
    """
    if dp is not None and eng.stochastic:
        raise EpcError("data-parallel evaluation applies to rate neurons; this network's "
                       "bernoulli neurons draw their spikes in one process")
    if dp is not None:
        return _evaluate_sharded(eng, x, y, dp, batch_size=batch_size, max_sweeps=max_sweeps,
                                 tol=tol, mode=mode, predictions=predictions)
    correct, loss, unconv, sweeps, nb = 0, 0.0, 0, 0, 0
    preds = []
    predicted: set[int] = set()      # the classes predicted / labelled so far
    labelled: set[int] = set()
    watch = [j for j in eng.settled if eng.states[j].role in ("hidden", "output")]
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}
    n = x.shape[0]
    counts = SpikeCounts(eng) if eng.stochastic else None
    for i in range(0, n, batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size].to(eng.device)
        batch = eng.prepare(xb)
        gen = (generator(eng.device, mix_seed(seed, EVAL_STREAM, i // batch_size))
               if eng.stochastic else None)
        r = eng.settle(batch, max_sweeps=max_sweeps, tol=tol, mode=mode, gen=gen,
                       counts=counts)
        bad = eng.check_finite(r.states)
        if bad:
            raise Diverged(f"evaluation diverged: {bad}")
        _widen_ranges(lo, hi, r.states, watch)
        p = eng.predict(r.states)
        if predictions:
            preds.append(p.cpu().numpy())
        predicted.update(p.unique().tolist())
        labelled.update(yb.unique().tolist())
        correct += int((p == yb).sum())
        loss += float(eng.loss(r.states, batch, yb).sum())
        unconv += r.unconverged
        sweeps += r.sweeps
        nb += 1
    # (one sample cannot vary: no verdict below two)
    spans = (torch.stack([(hi[j] - lo[j]).amax() for j in watch]).tolist()
             if watch and lo and n >= 2 else [])
    one_class = len(labelled) >= 2 and len(predicted) == 1
    out = {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1),
           "unconverged_fraction": unconv / max(n, 1), "mean_sweeps": sweeps / max(nb, 1),
           "samples": n, "dead_states": [j for j, s in zip(watch, spans) if s <= DEAD_SPAN],
           "constant_prediction": next(iter(predicted)) if one_class else None}
    out.update(inference_cost(eng, out["mean_sweeps"], counts, n))
    if predictions:
        out["predictions"] = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    return out


def _evaluate_sharded(eng: Engine, x: torch.Tensor, y: torch.Tensor, dp: DataParallel, *,
                      batch_size: int, max_sweeps, tol, mode, predictions: bool) -> dict:
    """`evaluate` with each batch split over the processes: the settles stop as the whole
    batch's would, and the counts, the states' spans and the classes predicted and labelled
    are reduced at the end (three collectives; the predictions gathered when asked)."""
    dp.attach(eng)
    sums = torch.zeros(3, dtype=torch.float64)      # correct, loss, unconverged
    sweeps, nb = 0, 0
    k = eng.num_classes
    predicted = torch.zeros(k, dtype=torch.float64)
    labelled = torch.zeros(k, dtype=torch.float64)
    watch = [j for j in eng.settled if eng.states[j].role in ("hidden", "output")]
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}
    preds, sizes = [], []            # this process's predictions; every shard's size
    n = x.shape[0]
    for i in range(0, n, batch_size):
        sh = dp.shard(min(batch_size, n - i))
        xb = sh.rows(x[i:i + batch_size])
        yb = sh.rows(y[i:i + batch_size]).to(eng.device)
        batch = eng.prepare(xb)
        r = eng.settle(batch, max_sweeps=max_sweeps, tol=tol, mode=mode)
        bad = eng.check_finite(r.states)
        dp.fail_together(f"evaluation diverged: {bad}" if bad else None, Diverged,
                         "the divergence check")
        sweeps += r.sweeps
        nb += 1
        sizes.append(sh.sizes)
        if not sh.size:          # a copy of a sample of the batch, settled for the stops
            continue
        _widen_ranges(lo, hi, r.states, watch)
        p = eng.predict(r.states)
        if predictions:
            preds.append(p)
        predicted[p.cpu()] = 1.0
        labelled[yb.cpu()] = 1.0
        sums += torch.tensor([float((p == yb).sum()), float(eng.loss(r.states, batch, yb).sum()),
                              float(r.unconverged)], dtype=torch.float64)
    total = dp.sum(torch.cat([sums, predicted, labelled]), "the evaluation's counts")
    correct, loss, unconv = total[:3].tolist()
    one_class = int(total[3 + k:].gt(0).sum()) >= 2 and int(total[3:3 + k].gt(0).sum()) == 1
    constant = int(total[3:3 + k].gt(0).nonzero()[0]) if one_class else None
    spans = []
    if watch and n >= 2:
        # -lo and hi of every watched state in one bucket, maxima over the processes (a
        # process that saw no sample contributes -inf)
        parts = []
        for j in watch:
            none = torch.full((eng.widths[j],), -math.inf, dtype=eng.dtype, device=eng.device)
            parts += [(-lo[j]).reshape(-1) if j in lo else none,
                      hi[j].reshape(-1) if j in hi else none]
        m = dp.max(torch.cat(parts), "the evaluation's state spans")
        at = 0
        for j in watch:
            w = eng.widths[j]
            lo_j, hi_j = -m[at:at + w], m[at + w:at + 2 * w]
            spans.append(float((hi_j - lo_j).amax()))
            at += 2 * w
    out = {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1),
           "unconverged_fraction": unconv / max(n, 1), "mean_sweeps": sweeps / max(nb, 1),
           "samples": n, "dead_states": [j for j, s in zip(watch, spans) if s <= DEAD_SPAN],
           "constant_prediction": constant}
    if predictions:
        mine = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64,
                                                          device=eng.device)
        per = dp.gather_rows(mine, [sum(s[r] for s in sizes) for r in range(dp.world)],
                             "the evaluation's predictions")
        # back to the split's order: batch by batch, each batch's shards in rank order
        at = [0] * dp.world
        order = []
        for s in sizes:
            for r in range(dp.world):
                order.append(per[r][at[r]:at[r] + s[r]])
                at[r] += s[r]
        out["predictions"] = (torch.cat(order).cpu().numpy() if order
                              else np.zeros(0, dtype=np.int64))
    return out


def inference_cost(eng: Engine, sweeps: float, counts: SpikeCounts | None, n: int) -> dict:
    """What one free phase costs: multiply-adds (inputs' couplings once, rate-read
    couplings every sweep) and, for bernoulli networks, spikes and synaptic events."""
    once, per_sweep = eng.multiply_adds()
    out = {"multiply_adds_per_inference": once + per_sweep * sweeps}
    if counts is not None:
        t = counts.totals()
        out.update({"time_steps": eng.max_sweeps,
                    "spike_rate": t["spikes"] / max(t["unit_steps"], 1),
                    "synaptic_events_per_inference": t["events"] / max(n, 1)})
    return out


@dataclass
class TrainState:
    epoch: int = 0                       # epochs completed
    history: list = field(default_factory=list)
    seconds: float = 0.0


class Trainer:
    """Owns the engine, optimiser and warm-start buffers of one run (with `dp`, this
    process's part of a data-parallel run)."""

    def __init__(self, eng: Engine, data: Data, cfg: TrainConfig,
                 dp: DataParallel | None = None):
        self.eng, self.data, self.cfg = eng, data, cfg.check()
        cfg.check_engine(eng)
        if dp is not None and eng.stochastic:
            raise EpcError("data-parallel training applies to rate neurons; this network's "
                           "bernoulli neurons draw their spikes in one process")
        if eng.precision != self.cfg.precision:
            raise EpcError(f"the engine settles in {eng.precision} and the run asks for "
                           f"--precision {self.cfg.precision}: make the engine with "
                           f"precision={self.cfg.precision!r}")
        self.dp = dp
        self.world = dp.world if dp is not None else 1
        if dp is not None:
            if cfg.batch_size < dp.world:
                raise EpcError(f"--batch-size {cfg.batch_size} is smaller than the "
                               f"{dp.world} processes of the run: each process settles a "
                               f"share of every batch (the global batch), so it needs at "
                               f"least one sample per process")
            dp.attach(eng)
        steps = cfg.epochs * math.ceil(data.train.x.shape[0] / cfg.batch_size)
        # per-level learning rates: factors on lr from the graph (runtime/layer_lrs.py)
        scales, self.level_factors = layer_lrs.factors(eng.graph, cfg.layer_lrs,
                                                       eng.learnable)
        self.opt = Optimizer(eng.params, eng.learnable, kind=cfg.optimizer, lr=cfg.lr,
                             momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                             clip=cfg.clip, cosine=cfg.cosine, total_steps=steps,
                             decoupled=cfg.decoupled_wd, lr_scales=scales)
        if cfg.nudge_form == "deviation" and cfg.gradient == "ep":
            deviation.check(eng)
        self.state = TrainState()
        self.warm: dict[str, torch.Tensor] | None = None
        if cfg.warm_start:
            n = data.train.x.shape[0]
            self.warm = {j: torch.zeros((n,) + eng.shapes[j], dtype=eng.dtype)
                         for j in eng.settled}
        self.sweep_trace: list[dict] = []
        self.initial: dict | None = None      # the free phase before any EP step
        # a warm start's record (runtime/warm.py): the backprop epochs' history and the free
        # phase before them; kept in checkpoints, so a resumed run reports it
        self.warm_record: dict | None = None
        self.initial_loss: float | None = None       # the first batch's, for the watch
        self.chance = chance_level(data.test.y.numpy())
        self.augment = Augment.parse(cfg.augment)
        if self.augment is not None:
            self.augment.check(tuple(data.train.x.shape[1:]))

    # ------------------------------------------------------------------ one step
    def step(self, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, epoch: int,
             number: int = 0) -> dict:
        """One step on the batch xb, yb (rows idx of the training set); with data
        parallelism the global batch, of which this process settles its shard. `number`:
        the batch's index in the epoch, which with the seed and the epoch seeds a
        bernoulli network's spikes."""
        eng, cfg, dp = self.eng, self.cfg, self.dp
        sh = None
        if dp is not None:
            sh, idx_all = dp.shard(len(idx)), idx
            xb, yb, idx = sh.rows(xb), sh.rows(yb), sh.rows(idx)
        batch = eng.prepare(xb)
        yb = yb.to(eng.device)
        init = None
        if self.warm is not None:
            init = {j: eng.to_layout(j, self.warm[j][idx].to(eng.device)) for j in eng.settled}
        # a bernoulli network's spikes: one generator per step, which the nudged phases
        # continue (runtime/spikes.py), so a resumed run draws what the original drew
        gen = (generator(eng.device, mix_seed(cfg.seed, epoch, number)) if eng.stochastic
               else None)
        record = eng.stochastic and cfg.estimate == "spikes"
        free = eng.settle(batch, init, max_sweeps=cfg.max_sweeps, tol=cfg.tol, mode=cfg.mode,
                          trace=not self.sweep_trace, gen=gen)
        if free.trace:
            self.sweep_trace = free.trace
        bad = eng.check_finite(free.states)
        diverged = (f"training diverged in epoch {epoch + 1}: {bad} after the free phase; "
                    f"lower --lr or --beta, or add --clip") if bad else None
        if diverged and dp is None:
            raise Diverged(diverged)
        # (data parallel: said with the step's all-reduce, below; meanwhile the nudged
        # phases of a diverged shard stop at once, on non-finite changes)
        nsw = cfg.nudge_sweeps if cfg.nudge_sweeps is not None else eng.nudge_sweeps
        rt = (free.routing or eng.routing(free.states, batch)) if cfg.freeze_pool else None
        skipped = excluded = 0
        if cfg.gradient == "implicit":
            # differentiated on the max-pool selections of the free point, as EP nudges;
            # samples whose adjoint iteration does not converge are left out of the loss
            grads, info = implicit_gradient(eng, batch, free.states, yb, mode="colour",
                                            routing=rt or free.routing, iters=IMPLICIT_ITERS,
                                            tol=IMPLICIT_TOL, drop_samples=True)
            nudged_sweeps = 0.0
            excluded = info["dropped"]
            if not info["converged"]:      # no sample kept
                grads, skipped = None, 1
        elif cfg.nudge_form == "deviation":
            plus, minus, sw = deviation.settle_pair(eng, batch, free.states, beta=cfg.beta,
                                                    labels=yb, max_sweeps=nsw)
            grads = deviation.ep_gradient(eng, batch, plus, minus, cfg.beta)
            nudged_sweeps = sw
        elif cfg.nudge == "symmetric":
            plus, minus = eng.settle_pair(batch, free.states, beta=cfg.beta, labels=yb,
                                          max_sweeps=nsw, tol=cfg.tol, mode=cfg.mode,
                                          routing=rt, gen=gen, carry=free.carry,
                                          record=record)
            if record:
                grads = spike_train_gradient(eng, batch, plus.recorded, minus.recorded,
                                             cfg.beta, routing=rt, labels=yb)
            else:
                grads = ep_gradient(eng, batch, plus.states, minus.states, cfg.beta,
                                    routing=rt, labels=yb)
            nudged_sweeps = (plus.sweeps + minus.sweeps) / 2
        else:
            plus = eng.settle(batch, free.states, beta=cfg.beta, labels=yb, max_sweeps=nsw,
                              tol=cfg.tol, mode=cfg.mode, routing=rt, gen=gen,
                              carry=free.carry)
            grads = ep_gradient(eng, batch, plus.states, free.states, cfg.beta, one_sided=True,
                                routing=rt, labels=yb)
            nudged_sweeps = plus.sweeps
        # (from the free states alone: the same before or after the update)
        correct, loss = torch.stack([(eng.predict(free.states) == yb).sum().to(eng.dtype),
                                     eng.loss(free.states, batch, yb).sum()]).tolist()
        unconverged = free.unconverged
        if dp is not None:
            if not sh.size:     # a copy settled for the collectives: it counts for nothing
                correct = loss = unconverged = excluded = 0
            grads, skipped, (correct, loss, unconverged, excluded, nbad) = self._all_reduce(
                grads, sh, excluded, [correct, loss, unconverged, excluded, bool(diverged)])
            if nbad:
                dp.fail_together(diverged, Diverged, "the divergence check", known=True)
        try:
            if grads is None:
                self.opt.skip()
                gnorm = float("nan")
            else:
                gnorm = self.opt.step(grads)
        except NonFiniteGradient as e:
            err = Diverged(f"training diverged in epoch {epoch + 1}: the gradient of "
                           f"{e.name} holds NaN/Inf; lower --lr or --beta, or add --clip")
            raise every_process(err) if dp is not None else err
        if self.warm is not None:
            if dp is None:
                for j in eng.settled:
                    self.warm[j][idx] = free.states[j].detach().to("cpu")
            else:       # every process keeps the whole buffer: the shards' states gathered
                for j in eng.settled:
                    parts = dp.gather_rows(free.states[j].detach()[:sh.size], sh.sizes,
                                           "the warm-start gather")
                    self.warm[j][idx_all] = torch.cat(parts).to("cpu")
        return {"correct": int(correct), "loss": loss,
                "unconverged": int(unconverged), "free_sweeps": free.sweeps,
                "nudged_sweeps": nudged_sweeps, "grad_norm": gnorm, "skipped": skipped,
                "excluded": int(excluded)}

    def _all_reduce(self, grads: dict | None, sh, excluded: int, counts: list):
        """Sum this process's estimate and `counts` (numbers) with the others' (one flat
        all-reduce).

        The estimate of each process is a mean over its samples (EP) or over the samples
        its implicit gradient kept; weighted by that number, summed, and divided by the
        sum, it is the whole batch's mean. A copy settled for an empty shard weighs 0.
        Returns (grads or None when no process kept a sample, skipped, summed counts)."""
        eng, dp = self.eng, self.dp
        counts = [float(c) for c in counts]
        weight = (sh.size - excluded if self.cfg.gradient == "implicit" else sh.size) \
            if sh.size else 0
        if grads is None:       # the implicit gradient kept no sample here
            grads = {k: torch.zeros_like(eng.params[k]) for k in eng.learnable}
        keys = [k for k in eng.learnable if k in grads]     # the same in every process
        flat = torch.cat([grads[k].reshape(-1) * weight if weight else
                          torch.zeros(grads[k].numel(), dtype=eng.dtype, device=eng.device)
                          for k in keys] +
                         [torch.tensor(counts + [weight], dtype=eng.dtype, device=eng.device)])
        flat = dp.sum(flat, "the step's all-reduce")
        tail = flat[-(len(counts) + 1):].tolist()
        total = tail[-1]
        if total == 0:            # no process kept a sample: the step applies nothing
            return None, 1, tail[:-1]
        out, at = {}, 0
        for k in keys:
            m = grads[k].numel()
            out[k] = (flat[at:at + m] / total).view(grads[k].shape)
            at += m
        return out, 0, tail[:-1]

    # ------------------------------------------------------------------ epochs
    def measure_initial(self) -> dict:
        """The model as it starts, before any EP step: its free phase on the test split
        (what a warm conversion from backprop-trained weights begins with). Measured under
        a forked RNG, so a run's bits are the same with or without it (stochastic neurons
        draw from torch's generator while settling)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            te = evaluate(self.eng, self.data.test.x, self.data.test.y,
                          batch_size=cfg.eval_batch_size, max_sweeps=cfg.max_sweeps,
                          tol=cfg.tol, mode=cfg.mode, dp=self.dp)
        return {"epoch": 0, "test_accuracy": te["accuracy"], "test_loss": te["loss"],
                "test_unconverged_fraction": te["unconverged_fraction"],
                "mean_free_sweeps": te["mean_sweeps"], "dead_states": te["dead_states"],
                "constant_prediction": te["constant_prediction"],
                "seconds": time.perf_counter() - t0}

    def run(self, *, progress: Callable | None = None, on_epoch: Callable | None = None,
            stop_after: int | None = None) -> TrainState:
        cfg, tr = self.cfg, self.data.train
        n = tr.x.shape[0]
        done_now = 0
        if self.state.epoch == 0 and self.initial is None and cfg.epochs > 0:
            self.initial = self.measure_initial()
        while self.state.epoch < cfg.epochs:
            if stop_after is not None and done_now >= stop_after:
                break
            e = self.state.epoch
            t0 = time.perf_counter()
            perm = _epoch_perm(n, cfg.seed, e)
            gen = epoch_generator(cfg.seed, e) if self.augment is not None else None
            tot = {"correct": 0, "loss": 0.0, "unconverged": 0, "free_sweeps": 0,
                   "nudged_sweeps": 0.0, "skipped": 0, "excluded": 0, "batches": 0,
                   "seen": 0}
            for i in range(0, n, cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                xb = tr.x[idx] if gen is None else self.augment(tr.x[idx], gen)
                r = self.step(xb, tr.y[idx], idx, e, i // cfg.batch_size)
                if e == 0 and tot["batches"] == 0:
                    self.initial_loss = r["loss"] / max(len(idx), 1)
                for k in ("correct", "loss", "unconverged", "free_sweeps", "nudged_sweeps",
                          "skipped", "excluded"):
                    tot[k] += r[k]
                tot["batches"] += 1
                tot["seen"] += len(idx)
                if progress:
                    progress(e, tot["seen"], n, tot["loss"] / tot["seen"],
                             tot["correct"] / tot["seen"])
            for name in self.eng.learnable:
                if not torch.isfinite(self.eng.params[name]).all():
                    err = Diverged(f"training diverged in epoch {e + 1}: weight {name} holds "
                                   f"NaN/Inf; lower --lr")
                    # (every process holds the same weights)
                    raise every_process(err) if self.dp is not None else err
            train_secs = time.perf_counter() - t0
            te = evaluate(self.eng, self.data.test.x, self.data.test.y,
                          batch_size=cfg.eval_batch_size, max_sweeps=cfg.max_sweeps,
                          tol=cfg.tol, mode=cfg.mode, dp=self.dp, seed=cfg.seed)
            rec = {"epoch": e + 1, "train_loss": tot["loss"] / n,
                   "train_accuracy": tot["correct"] / n, "test_loss": te["loss"],
                   "test_accuracy": te["accuracy"],
                   "unconverged_fraction": tot["unconverged"] / n,
                   "test_unconverged_fraction": te["unconverged_fraction"],
                   "mean_free_sweeps": tot["free_sweeps"] / tot["batches"],
                   "mean_nudged_sweeps": tot["nudged_sweeps"] / tot["batches"],
                   "skipped_steps": tot["skipped"], "steps": tot["batches"],
                   "samples": tot["seen"], "excluded_samples": tot["excluded"],
                   "dead_states": te["dead_states"],
                   "constant_prediction": te["constant_prediction"],
                   "lr": self.opt.current_lr(), "seconds": train_secs,
                   "eval_seconds": time.perf_counter() - t0 - train_secs,
                   # the cost of one test inference (see evaluate)
                   **{k: te[k] for k in COST_KEYS if k in te}}
            if e == 0 and self.initial_loss is not None:
                rec["initial_loss"] = self.initial_loss
            if e == 0 and self.warm_record is not None:
                rec["cold_loss"] = self.warm_record["initial"]["test_loss"]
            why = divergence(self.state.history + [rec], self.chance)
            if why is not None:
                msg = f"training diverged in epoch {e + 1}: {why}"
                if cfg.divergence == "stop":
                    err = Diverged(f"{msg}; stopped (the last checkpoint, if any, holds epoch "
                                   f"{e}); lower --lr, or --divergence warn to go on",
                                   record=rec)
                    # (decided on the reduced losses and accuracies: alike in every process)
                    raise every_process(err) if self.dp is not None else err
                rec["divergence_warning"] = msg
            self.state.history.append(rec)
            self.state.epoch += 1
            self.state.seconds += time.perf_counter() - t0
            done_now += 1
            if on_epoch:
                on_epoch(self, rec)
        return self.state

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_bundle(self, base: Bundle) -> Bundle:
        g = self.eng.graph.copy()
        g.weights.update(self.eng.weights_numpy())
        arrays = dict(self.opt.state_arrays())
        if self.warm is not None:
            for j, v in self.warm.items():
                arrays[f"warm.{j}"] = v.numpy()
        docs = {"train_state": {"epoch": self.state.epoch, "seconds": self.state.seconds,
                                "config": dataclasses.asdict(self.cfg),
                                "data": self.data.name, "processes": self.world},
                "history": self.state.history}
        if self.initial is not None:
            docs["train_state"]["initial"] = self.initial
        if self.warm_record is not None:
            docs["warm_start"] = self.warm_record
        meta = dict(base.meta)
        meta["trained"] = {"epochs": self.state.epoch, "data": self.data.name}
        return Bundle(g, target="torch", meta=meta, arrays=arrays, docs=docs)

    def restore(self, ck: Bundle, where: str) -> None:
        ts = ck.docs.get("train_state")
        if not isinstance(ts, dict) or not isinstance(ts.get("config"), dict):
            raise EpcError(f"{where}: incompatible checkpoint: no training state "
                           f"(not written by epc train --checkpoint)")
        epoch, secs, history = ts.get("epoch"), ts.get("seconds", 0.0), ck.docs.get("history")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or \
                not 0 <= epoch <= self.cfg.epochs or \
                isinstance(secs, bool) or not isinstance(secs, (int, float)) or \
                not (math.isfinite(secs) and secs >= 0) or not isinstance(history, list) or \
                len(history) != epoch or not all(_is_record(h) for h in history):
            raise EpcError(f"{where}: corrupt checkpoint: its training state (epoch, seconds, "
                           f"history) does not hold together")
        old = {**TrainConfig.RESUME_DEFAULTS, **ts["config"]}
        diff = [k for k in TrainConfig.RESUME_KEYS
                if k in old and old[k] != getattr(self.cfg, k)]
        if "backprop_epochs" in diff:       # the warm start decides every weight after it
            n, m = old["backprop_epochs"], self.cfg.backprop_epochs
            raise EpcError(f"{where}: incompatible checkpoint: it was trained after {n} "
                           f"backprop epochs (a warm start), this run asks for {m}: resume "
                           f"with --backprop-epochs {n}")
        if diff:
            k = diff[0]
            raise EpcError(f"{where}: incompatible checkpoint: it was trained with "
                           f"{k}={old[k]!r}, this run has {k}={getattr(self.cfg, k)!r} "
                           f"(resume with the same settings)")
        # the estimates are the same sums in any number of processes, but not the same
        # bits: a run continues exactly only with the processes it started with
        # (checkpoints written before data parallelism were trained by one)
        was = ts.get("processes", 1)
        if was != self.world:
            how = ("in one process (epc train without torchrun)" if was == 1 else
                   f"with {was} processes (torchrun: nodes x processes per node = {was})")
            raise EpcError(f"{where}: incompatible checkpoint: it was trained by {was} "
                           f"process{'es' if was != 1 else ''}, this run has {self.world}: "
                           f"resume it {how}, or start a new run from its weights (epc "
                           f"train {where}, without --resume)")
        if ts.get("data") != self.data.name:
            raise EpcError(f"{where}: incompatible checkpoint: trained on {ts.get('data')}, "
                           f"this run uses {self.data.name}")
        mine = self.eng.graph.weights
        for k, v in ck.graph.weights.items():
            if k not in mine or tuple(mine[k].shape) != tuple(v.shape):
                raise EpcError(f"{where}: incompatible checkpoint: weight {k} "
                               f"{list(v.shape)} does not match this model")
        if set(mine) != set(ck.graph.weights):
            missing = sorted(set(mine) - set(ck.graph.weights))
            raise EpcError(f"{where}: incompatible checkpoint: lacks weight {missing[0]}")
        # the optimiser's and warm-start arrays: exactly the shapes this run keeps (a
        # tensor copy would broadcast a smaller one silently), finite numbers
        want = {k: tuple(v.shape) for k, v in self.opt.state_arrays().items()}
        if self.warm is not None:
            want.update({f"warm.{j}": tuple(v.shape) for j, v in self.warm.items()})
        for k, shape in want.items():
            a = ck.arrays.get(k)
            if a is None and k == "opt.skipped":
                continue         # checkpoints written before skipped steps were counted
            kinds = "iu" if k in ("opt.step", "opt.skipped") else "f"
            if a is None or tuple(a.shape) != shape or a.dtype.kind not in kinds or \
                    not np.all(np.isfinite(a)):
                raise EpcError(f"{where}: incompatible checkpoint: its {k} "
                               f"{'is missing' if a is None else 'does not match this run'} "
                               f"(optimiser {self.cfg.optimizer}"
                               f"{', warm start' if self.warm is not None else ''})")
        if int(ck.arrays["opt.step"][0]) < 0:
            raise EpcError(f"{where}: corrupt checkpoint: negative optimiser step count")
        for k, v in ck.graph.weights.items():
            self.eng.params[k].copy_(torch.as_tensor(v))
        self.opt.load_state_arrays(ck.arrays, where)
        if self.warm is not None:
            for j in self.warm:
                self.warm[j].copy_(torch.as_tensor(ck.arrays[f"warm.{j}"]))
        self.state = TrainState(epoch, list(history), float(secs))
        initial = ts.get("initial")
        if isinstance(initial, dict) and isinstance(initial.get("test_accuracy"), float):
            self.initial = initial
        warm = ck.docs.get("warm_start")
        if self.cfg.backprop_epochs:
            if not (isinstance(warm, dict) and isinstance(warm.get("history"), list)
                    and len(warm["history"]) == self.cfg.backprop_epochs):
                raise EpcError(f"{where}: corrupt checkpoint: it was trained with "
                               f"{self.cfg.backprop_epochs} backprop epochs and holds no "
                               f"record of them")
            self.warm_record = warm


_RECORD_KEYS = {"epoch": int, "train_loss": float, "train_accuracy": float,
                "test_accuracy": float, "test_loss": float, "seconds": float}


def _is_record(h) -> bool:
    """An epoch record as training writes it (what resume, metrics and the watch read)."""
    return isinstance(h, dict) and all(
        isinstance(h.get(k), (int, float)) and not isinstance(h.get(k), bool)
        and (t is float or isinstance(h.get(k), int)) for k, t in _RECORD_KEYS.items())


def save_checkpoint(trainer: Trainer, base: Bundle, directory: str | Path) -> Path:
    path = Path(directory) / "last.epc"
    write_bundle(path, trainer.checkpoint_bundle(base))
    return path


def load_checkpoint(directory: str | Path) -> tuple[Bundle, str]:
    p = Path(directory)
    path = p / "last.epc" if p.is_dir() or not p.suffix else p
    if not path.exists():
        raise EpcError(f"--resume: no checkpoint at {path}")
    return read_bundle(path), str(path)
