"""The runtime's entry points for float bundles: train, evaluate, check gradients.

    from epc.runtime.api import train, evaluate, check_gradients
    m = train("mlp.epc", data="digits", epochs=30, seed=0, checkpoint="ckpt")
    evaluate("ckpt/last.epc", data="digits")["accuracy"]
    check_gradients("mlp.epc", data="digits", beta=0.01)["couplings"]

Every function accepts a bundle path, a `Bundle` or an energy `Graph`; bundles may be
target 'torch' or plain IR of an energy graph (lowered on the fly). The driver's `epc.train`,
`epc.evaluate` and `epc.check_gradients` (epc/api.py: the CLI's options and defaults, and
neuromorphic programs) call these. `dataset=(train_ds, test_ds)` trains on
any pair of torch Datasets of (input, label) items instead of a named data set.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from epc.compiler import flags
from epc.compiler.bundle import Bundle, atomic_write_bytes, remove_stale_temporaries
from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph
from epc.compiler.limits import check_memory, numel

from . import layer_lrs
from .data import Data, load_dataset
from .distributed import DEFAULT_TIMEOUT, DataParallel, joined, process_device
from .engine import PRECISIONS, Engine, schedule_mode
from .memory import retain_freed_memory
from .warm import BACKPROP_LR
from .train import (COST_KEYS, Diverged, Trainer, TrainConfig, TrainState,
                    evaluate as _evaluate, load_checkpoint, save_checkpoint)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_LR = 5e-4      # EP's peak learning rate when --lr is not given (a cold start)


def _device(device: str | None) -> torch.device:
    dev = flags.check("device", device or "cpu")
    d = torch.device(dev)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise EpcError(f"--device {dev}: CUDA is not available on this machine")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        k = torch.cuda.device_count()
        raise EpcError(f"--device {dev}: this machine has {k} CUDA device{'s' * (k != 1)} "
                       f"(cuda:0{f' to cuda:{k - 1}' if k > 1 else ''})")
    if d.type == "cuda":
        # float32 means IEEE float32 on a GPU too: cuDNN's convolutions would otherwise
        # round their inputs to TF32 (10-bit mantissa, ~1e-3 relative), above the settling
        # tolerance (1e-4) and into the EP difference of the nudged phases.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if d.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise EpcError(f"--device {dev}: MPS is not available on this machine")
    return d


def load_bundle(src: Any) -> tuple[Bundle, str]:
    """(runtime bundle, name for messages) from a path, Bundle or energy Graph."""
    from epc.targets.torch import load_for_runtime, lower
    if isinstance(src, Graph):
        return lower(Bundle(src), f"graph {src.name}"), f"graph {src.name}"
    if isinstance(src, Bundle):
        return lower(src, f"graph {src.graph.name}"), f"graph {src.graph.name}"
    if isinstance(src, (str, os.PathLike)):
        return load_for_runtime(src), str(src)
    raise EpcError(f"expected a bundle path, Bundle or Graph, got {type(src).__name__}")


def check_precision(precision: str, device: torch.device) -> str:
    """--precision: its rule, and a 16-bit dtype this device computes in (one line where
    it does not)."""
    flags.check("precision", precision)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise EpcError(f"--precision bf16: {device} ({name}, compute capability {cc}) has "
                       f"no bfloat16 arithmetic (CUDA needs 8.0, Ampere, or later); use "
                       f"--precision fp16 or fp32")
    if PRECISIONS[precision] is not None and device.type == "mps":
        try:
            (torch.ones(2, 2, dtype=PRECISIONS[precision], device=device) @
             torch.ones(2, 2, dtype=PRECISIONS[precision], device=device))
        except (RuntimeError, TypeError) as e:
            raise EpcError(f"--precision {precision}: {device} cannot compute in it "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    return precision


def make_engine(src: Any, *, device: str | None = None, dtype: str = "float32",
                schedule: str | None = None,
                precision: str = "fp32") -> tuple[Engine, Bundle, str]:
    flags.check("dtype", dtype)
    dev = device if isinstance(device, torch.device) else _device(device)
    check_precision(precision, dev)
    b, name = load_bundle(src)
    return Engine(b.graph, device=dev, dtype=DTYPES[dtype], mode=schedule,
                  precision=precision), b, name


def recipe(eng: Engine, cfg: TrainConfig, warm: dict | None = None) -> dict:
    """The depth recipe a run trains with, in words a user can pass back as flags: the
    feedback regulation the compiled graph carries (`epc compile --feedback-gain`, 'auto'
    resolved per graph), the form of weight decay, the EP learning rate and the warm start
    by backprop (`warm`: `_warm_plan`'s, what --backprop-epochs and --lr resolved to), and
    the learning rate of each depth level (`--layer-lrs`, 'auto' resolved for the graph)."""
    gains = eng.feedback_gain          # the couplings whose feedback gain is not 1
    fb = ({"feedback_gain": 1.0, "regulated_couplings": 0} if not gains else
          # a chain coupling (depth d to d+1) carries the ratio R, a skip over k levels R^k
          {"feedback_gain": max(gains.values()), "regulated_couplings": len(gains),
           "smallest_gain": min(gains.values())})
    return {**fb, "hidden_states": sum(s.role == "hidden" for s in eng.graph.states),
            "weight_decay": cfg.weight_decay,
            "weight_decay_form": "decoupled" if cfg.decoupled_wd else "L2",
            "lr": cfg.lr, "backprop_epochs": cfg.backprop_epochs,
            **({"backprop_lr": cfg.backprop_lr} if cfg.backprop_epochs else {}),
            **({"lr_rule": warm["lr_rule"], "warm_start_rule": warm["why"]} if warm else {}),
            "layer_lrs": cfg.layer_lrs,
            "layer_learning_rates": [cfg.lr * f for f in
                                     layer_lrs.factors(eng.graph, cfg.layer_lrs, [])[1]]}


def _data_for(eng: Engine, data: str, data_dir, resize, channels, dataset) -> Data:
    if len(eng.inputs) != 1:
        raise EpcError(f"graph has {len(eng.inputs)} inputs; the runtime trains one-input graphs")
    return load_dataset(data, data_dir=data_dir, input_shape=eng.input_shapes[eng.inputs[0]],
                        resize=resize, channels=channels, num_classes=eng.num_classes,
                        dataset=dataset)


# copies of a batch's states settling keeps (free, nudged and previous states, updates):
# peak memory over batch x states x itemsize measured 4.6 (MobileNet) to 5.5 (ResNet-13)
# when evaluating the CIFAR examples at batch 256; check-gradients (autograd through the
# sweeps, float64) takes 4x that: ResNet-13, 64 samples, 1.03 GB over 4 samples' run (18.7)
STATE_COPIES = 5


def check_batch_memory(eng: Engine, batch: int, where: str, *, copies: int = STATE_COPIES,
                       extra: int = 0, whose: str = "", hint: str = "lower --batch-size, or "
                       ) -> None:
    """Refuse before settling when the states of a `batch` (plus `extra` bytes) would
    take more than the memory limit."""
    per_sample = sum(numel(s.shape) for s in eng.graph.states) + \
        sum(numel(i.shape) for i in eng.graph.inputs)
    item = torch.empty((), dtype=eng.dtype).element_size()
    check_memory(batch * per_sample * item * copies + extra,
                 f"settling {whose or 'batches'} of {batch} samples ({per_sample:,} state "
                 f"values each)" + (" and the warm-start states" if extra else ""), where,
                 hint=hint)


def configure_process(threads: int | None):
    """The process-wide settings a run takes: torch's thread count, and freed tensor memory
    kept for reuse (runtime/memory.py: a conv net's settling stops page-faulting)."""
    threads = flags.check("threads", threads)
    retain_freed_memory()
    if threads is not None:
        torch.set_num_threads(threads)


def _write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _fingerprint(trainer: Trainer) -> bytes:
    """What a process is about to run, as bytes that must agree over a data-parallel run:
    its options, data, weights and optimiser state."""
    import dataclasses
    import hashlib
    h = hashlib.sha256()
    d, eng = trainer.data, trainer.eng
    h.update(json.dumps({"config": dataclasses.asdict(trainer.cfg), "data": d.name,
                         "epoch": trainer.state.epoch,
                         "shapes": [list(d.train.x.shape), list(d.test.x.shape)]},
                        sort_keys=True).encode())
    for split in (d.train, d.test):
        h.update(split.y.numpy().tobytes())
        h.update(repr(float(split.x.sum(dtype=torch.float64))).encode())
    for k in sorted(eng.params):
        h.update(eng.params[k].detach().cpu().numpy().tobytes())
    for k, v in sorted(trainer.opt.state_arrays().items()):
        h.update(k.encode() + v.tobytes())
    return h.digest()


def _check_timeout(formed: bool, timeout: float) -> None:
    """--dist-timeout is a setting of the group epc forms; a group that exists already
    (the Python API inside the caller's own) keeps its own."""
    import torch.distributed as dist
    if not formed and timeout != DEFAULT_TIMEOUT and dist.is_available() \
            and dist.is_initialized():
        raise EpcError("--dist-timeout applies when epc forms the process group (under "
                       "torchrun); this process group was formed by the caller, with its "
                       "own timeout")


def train(src: Any, *, data: str = "digits", data_dir: str | None = None, resize=None,
          channels: int | None = None, dataset=None, epochs: int = 30, batch_size: int = 32,
          optimizer: str = "adam", lr: float | None = None, momentum: float = 0.9,
          weight_decay: float = 1e-3, decoupled_wd: bool = True, cosine: bool = True,
          clip: float | None = None, beta: float = 0.2, nudge: str = "symmetric",
          nudge_form: str = "states", gradient: str = "ep", estimate: str = "rates",
          layer_lrs: "str | tuple" = "auto", seed: int = 0,
          schedule: str | None = None, max_sweeps: int | None = None,
          nudge_sweeps: int | None = None, tol: float | None = None, warm_start: bool = False,
          freeze_pool: bool = True, augment: str | None = None,
          device: str | None = None, threads: int | None = None,
          checkpoint: str | None = None, resume: bool = False, stop_after: int | None = None,
          metrics_json: str | None = None, plot: str | None = None,
          divergence: str = "stop", dist_timeout: float = DEFAULT_TIMEOUT,
          precision: str = "fp32", backprop_epochs: "int | str" = 0,
          backprop_lr: float = BACKPROP_LR,
          progress: Callable | None = None, on_epoch: Callable | None = None) -> dict:
    """Train with EP; returns the metrics dict (also written to `metrics_json`).

    `backprop_epochs` (an int, or 'auto': runtime/warm.py decides from the graph): that
    many epochs of backprop on the graph's feedforward form (Adam at `backprop_lr`, cosine,
    the graph's label cost; same data and seed) before the EP epochs, a warm start. Their
    records go to `on_epoch` with `phase: 'backprop'` and to the metrics' `warm_start`;
    `initial` is then the free phase before them and `converted` the free phase after
    them, before any EP step. `lr` None: DEFAULT_LR, or DEFAULT_LR x WARM_LR_FACTOR after
    a warm start.

    Metrics: train_accuracy (running accuracy of the last epoch's free phases),
    test_accuracy, test_loss, epochs, seconds, unconverged_fraction (last epoch, free
    phase), samples_per_second and `history` (one record per epoch). `metrics_json` is
    rewritten after every epoch with `in_progress` true, and once more at the end.
    `augment` ('crop:N', 'flip' or both, comma-separated) augments image training batches
    (runtime/augment.py). `gradient='implicit'` trains with the exact gradient at the free
    fixed point instead of the EP estimate (a reference; samples whose adjoint iteration
    does not converge are left out of their step's gradient: each epoch record counts its
    `excluded_samples` and the `skipped_steps` that had none left and applied no update).
    The divergence watch (runtime/train.py) checks every epoch: a NaN/Inf loss, a train
    loss over 10x that of the first batch, or a test accuracy back at chance after a
    healthy start; `divergence='stop'` raises Diverged (the metrics file then says
    `diverged`, the checkpoint keeps the epoch before), 'warn' records
    `divergence_warning` in the epoch and goes on.
    `layer_lrs` ('none', 'auto' or per-level factors on `lr`, runtime/layer_lrs.py): the
    learning rate of each depth level of the graph; the run's `recipe` lists the rates.
    `precision` ('fp32', 'bf16', 'fp16'): the settle loop's states and its copy of the
    weights in 16 bits; drives summed and activated in float32, the stop test and the EP
    difference in float32, float32 master weights (runtime/engine.py).

    Data parallel (runtime/distributed.py): under torchrun (WORLD_SIZE > 1 in the
    environment) this forms a process group (gloo, or nccl for CUDA; `dist_timeout`
    seconds on every collective) and leaves it at the end; inside a process group the
    caller formed, it uses that one. Every process settles its shard of each global batch
    of `batch_size`; process 0 alone writes the checkpoint, metrics and plot and calls
    `progress` and `on_epoch`; every process returns the same metrics.
    """
    flags.check("backprop_epochs", backprop_epochs)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                      lr=DEFAULT_LR if lr is None else lr,
                      momentum=momentum, weight_decay=weight_decay, decoupled_wd=decoupled_wd,
                      cosine=cosine, clip=clip, beta=beta, nudge=nudge, nudge_form=nudge_form,
                      gradient=gradient, seed=seed, mode=schedule,
                      max_sweeps=max_sweeps, nudge_sweeps=nudge_sweeps, tol=tol,
                      warm_start=warm_start, freeze_pool=freeze_pool, augment=augment,
                      divergence=divergence, precision=precision, estimate=estimate,
                      backprop_lr=backprop_lr, layer_lrs=layer_lrs).check()
    if resume and not checkpoint:
        raise EpcError("--resume needs --checkpoint DIR (the run's checkpoint directory)")
    flags.check("stop_after", stop_after)
    flags.check("dist_timeout", dist_timeout)
    dev = _device(device)
    check_precision(cfg.precision, dev)
    configure_process(threads)
    torch.manual_seed(seed)
    with joined(dev, dist_timeout) as formed:
        _check_timeout(formed, dist_timeout)
        return _train(src, cfg, process_device(dev), data=data, data_dir=data_dir,
                      resize=resize, channels=channels, dataset=dataset, schedule=schedule,
                      resume=resume, checkpoint=checkpoint, stop_after=stop_after,
                      metrics_json=metrics_json, plot=plot, progress=progress,
                      on_epoch=on_epoch,
                      warm={"backprop_epochs": flags.check("backprop_epochs", backprop_epochs),
                            "lr_given": lr is not None})


def _warm_plan(eng: Engine, meta: dict, cfg: TrainConfig, asked, lr_given: bool) -> dict:
    """Resolve --backprop-epochs (auto: runtime/warm.py) on this graph into `cfg`, and the
    EP learning rate it implies when --lr is not given; returns how each was decided."""
    from .warm import resolve_epochs, warm_lr
    n, why = resolve_epochs(asked, eng.graph, meta)
    cfg.backprop_epochs = n
    if lr_given:
        rule = "given"
    elif n:
        cfg.lr = warm_lr(DEFAULT_LR)
        rule = f"after a warm start: {DEFAULT_LR:g} x {cfg.lr / DEFAULT_LR:g}"
    else:
        rule = "the default"
    return {"why": why, "lr_rule": rule}


def _check_train_memory(eng: Engine, d: Data, cfg: TrainConfig, name: str) -> None:
    """Refuse empty splits, and batches (with warm-start buffers) past the memory limit."""
    n_train = int(d.train.x.shape[0])
    if n_train == 0 or int(d.test.x.shape[0]) == 0:
        raise EpcError(f"{d.name}: the {'training' if n_train == 0 else 'test'} split is "
                       f"empty")
    biggest = min(max(cfg.batch_size, cfg.eval_batch_size),
                  max(n_train, int(d.test.x.shape[0])))
    warm = 0
    if cfg.warm_start:     # every training sample's last fixed point, kept between epochs
        item = torch.empty((), dtype=eng.dtype).element_size()
        warm = n_train * sum(numel(s.shape) for s in eng.graph.states) * item
    by_eval = biggest > cfg.batch_size      # the test evaluation's batches are the largest
    check_batch_memory(eng, biggest, name, extra=warm,
                       whose="each epoch's test evaluation in batches" if by_eval else "",
                       hint="" if by_eval else "lower --batch-size, or ")


def _train(src, cfg: TrainConfig, dev: torch.device, *, data, data_dir, resize, channels,
           dataset, schedule, resume, checkpoint, stop_after, metrics_json, plot, progress,
           on_epoch, warm: dict) -> dict:
    dp = DataParallel.current(dev)
    main = dp is None or dp.main
    box = {}
    # set up alike in every process: an error in one is raised in all, and what they are
    # about to run must agree
    with (dp.together(lambda: _fingerprint(box["trainer"])) if dp is not None
          else contextlib.nullcontext()):
        eng, base, name = make_engine(src, device=dev, schedule=schedule,
                                      precision=cfg.precision)
        d = _data_for(eng, data, data_dir, resize, channels, dataset)
        plan = _warm_plan(eng, base.meta, cfg, warm["backprop_epochs"], warm["lr_given"])
        if cfg.backprop_epochs and dp is not None:
            raise EpcError(f"--backprop-epochs {cfg.backprop_epochs} ({plan['why']}) runs in "
                           f"one process; train the weights first with `epc backprop MODEL "
                           f"-o warm.epc`, then run the data-parallel EP from warm.epc with "
                           f"--backprop-epochs 0")
        _check_train_memory(eng, d, cfg, name)
        trainer = box["trainer"] = Trainer(eng, d, cfg, dp)
        if checkpoint and main:
            # a write killed before its rename leaves .last.epc.*.tmp: this run replaces it
            remove_stale_temporaries(Path(checkpoint) / "last.epc")
        if resume:
            ck, where = load_checkpoint(checkpoint)
            if ck.target != "torch":
                raise EpcError(f"{where}: incompatible checkpoint: target {ck.target!r}, "
                               f"not 'torch'")
            trainer.restore(ck, where)
    if cfg.backprop_epochs and not resume:
        _warm_start(trainer, d, plan, on_epoch)
        if checkpoint:
            # epoch 0 after the backprop epochs: a run stopped in its EP epochs resumes
            # from here without repeating them (one stopped during them starts again)
            save_checkpoint(trainer, base, checkpoint)
    return _train_run(trainer, cfg, base, name, d, eng, dp, main, plan, checkpoint=checkpoint,
                      stop_after=stop_after, metrics_json=metrics_json, plot=plot,
                      progress=progress, on_epoch=on_epoch)


def _warm_start(trainer: Trainer, d: Data, plan: dict, on_epoch) -> None:
    """The backprop epochs of a warm start (runtime/warm.py), between the free phase of the
    weights as given (`initial`) and the converted one (`trainer.initial`, before any EP
    step); the global RNG is seeded again after them, as a resumed run seeds it."""
    from .warm import run_backprop
    cfg = trainer.cfg
    cold = trainer.measure_initial()
    rec = run_backprop(trainer.eng, d, epochs=cfg.backprop_epochs, lr=cfg.backprop_lr,
                       batch_size=cfg.batch_size, seed=cfg.seed,
                       on_epoch=(lambda r: on_epoch({**r, "phase": "backprop"}))
                       if on_epoch else None)
    torch.manual_seed(cfg.seed)
    trainer.warm_record = {**rec, "rule": plan["why"], "initial": cold}
    trainer.initial = trainer.measure_initial()


def _train_run(trainer: Trainer, cfg: TrainConfig, base: Bundle, name: str, d: Data,
               eng: Engine, dp: DataParallel | None, main: bool, plan: dict, *, checkpoint,
               stop_after, metrics_json, plot, progress, on_epoch) -> dict:
    """The epochs of `train`, with what process 0 writes and reports."""
    t0 = time.perf_counter()
    ntrain = d.train.x.shape[0]

    def metrics_of(st, last: dict, in_progress: bool) -> dict:
        train_secs = sum(h["seconds"] for h in st.history)
        m = {
            "model": name, "data": d.name, "device": str(eng.device),
            "epochs": st.epoch, "in_progress": in_progress, "seconds": st.seconds,
            "seconds_this_run": time.perf_counter() - t0,
            "train_accuracy": last["train_accuracy"], "test_accuracy": last["test_accuracy"],
            "test_loss": last.get("test_loss"),
            "unconverged_fraction": last["unconverged_fraction"],
            "skipped_steps": sum(h.get("skipped_steps", 0) for h in st.history),
            "excluded_samples": sum(h.get("excluded_samples", 0) for h in st.history),
            "best_test_accuracy": max([h["test_accuracy"] for h in st.history],
                                      default=last["test_accuracy"]),
            "samples_per_second": (ntrain * len(st.history) / train_secs) if train_secs > 0
            else None,
            "train_samples": ntrain, "test_samples": int(d.test.x.shape[0]),
            "config": {k: getattr(cfg, k) for k in TrainConfig.RESUME_KEYS},
            "recipe": recipe(eng, cfg, plan),
            # what else decides the bits of a run: the thread count changes the order of
            # torch's parallel sums, and so the last bits of every result
            "threads": torch.get_num_threads(), "torch_version": torch.__version__,
            # where tensors live; it changes timings, never bits
            "allocator": retain_freed_memory(),
            "divergence": cfg.divergence,
            "divergence_warnings": [h["divergence_warning"] for h in st.history
                                    if "divergence_warning" in h],
            # data parallel: the processes of the run (their global batch is batch_size)
            "processes": trainer.world,
            "history": st.history,
            # the cost of one test inference in the last epoch (multiply-adds; a bernoulli
            # network's time steps, spike rate and synaptic events)
            **{k: last[k] for k in COST_KEYS if k in last},
        }
        if trainer.warm_record is not None:
            # a warm start: the free phase before anything, the backprop epochs, and the
            # converted network (the free phase after them, before any EP step)
            m["warm_start"] = trainer.warm_record
            m["initial"] = trainer.warm_record["initial"]
            if trainer.initial is not None:
                m["converted"] = trainer.initial
        elif trainer.initial is not None:
            # the free phase before any EP step (a warm conversion's starting accuracy)
            m["initial"] = trainer.initial
        if checkpoint:
            m["checkpoint"] = str(Path(checkpoint) / "last.epc")
        return m

    def epoch_done(tr: Trainer, rec: dict):
        if not main:        # process 0 writes and reports for the run
            return
        if checkpoint:
            save_checkpoint(tr, base, checkpoint)
        if metrics_json:
            # rewritten (atomically) after every epoch: a long run can be followed, and an
            # interrupted one keeps its history; "in_progress" is false once the run ends
            _write_json(metrics_json, metrics_of(tr.state, rec, in_progress=True))
        if on_epoch:
            on_epoch(rec)

    try:
        st = trainer.run(progress=progress if main else None, on_epoch=epoch_done,
                         stop_after=stop_after)
    except Diverged as e:
        if metrics_json and main:  # the file says how the run ended, with the epoch that failed
            st = trainer.state
            hist = st.history + ([e.record] if e.record else [])
            m = metrics_of(TrainState(st.epoch, hist, st.seconds), hist[-1] if hist else {
                "train_accuracy": None, "test_accuracy": None,
                "unconverged_fraction": None}, in_progress=False)
            m["diverged"] = str(e)
            _write_json(metrics_json, m)
        raise
    last = st.history[-1] if st.history else None
    if last is None:  # zero epochs: report the model as it is
        te = _evaluate(eng, d.test.x, d.test.y, batch_size=cfg.eval_batch_size,
                       max_sweeps=cfg.max_sweeps, tol=cfg.tol, mode=cfg.mode, dp=dp)
        tr = _evaluate(eng, d.train.x, d.train.y, batch_size=cfg.eval_batch_size,
                       max_sweeps=cfg.max_sweeps, tol=cfg.tol, mode=cfg.mode, dp=dp)
        last = {"train_accuracy": tr["accuracy"], "test_accuracy": te["accuracy"],
                "test_loss": te["loss"], "unconverged_fraction": tr["unconverged_fraction"]}
    metrics = metrics_of(st, last, in_progress=False)
    if main and metrics_json:
        _write_json(metrics_json, metrics)
    if main and plot:
        from .plots import plot_run
        plot_run(st.history, trainer.sweep_trace, plot, title=f"{name} on {d.name}")
    if dp is not None:      # every process returns once process 0's files are written
        dp.barrier("the run's end")
    return metrics


def evaluate(src: Any, *, data: str = "digits", data_dir: str | None = None, resize=None,
             channels: int | None = None, dataset=None, split: str = "test",
             batch_size: int = 256, schedule: str | None = None, max_sweeps: int | None = None,
             tol: float | None = None, precision: str | None = None,
             device: str | None = None, threads: int | None = None,
             json_path: str | None = None) -> dict:
    """Free-phase accuracy / loss / convergence of a (trained) bundle on a split. Under
    torchrun, or inside the caller's process group, each batch is split over the
    processes (as in training) and process 0 writes `json_path`. `precision` (None: the
    training run's, else fp32): the settle loop's dtype, as in `train`."""
    for k, v in (("split", split), ("batch_size", batch_size), ("schedule", schedule),
                 ("max_sweeps", max_sweeps), ("tol", tol)):
        flags.check(k, v)
    dev = _device(device)
    if precision is not None:
        check_precision(precision, dev)
    configure_process(threads)
    with joined(dev, DEFAULT_TIMEOUT):
        return _evaluate_run(src, process_device(dev), data=data, data_dir=data_dir,
                             resize=resize, channels=channels, dataset=dataset, split=split,
                             batch_size=batch_size, schedule=schedule,
                             max_sweeps=max_sweeps, tol=tol, precision=precision,
                             json_path=json_path)


def _evaluate_run(src, dev: torch.device, *, data, data_dir, resize, channels, dataset, split,
                  batch_size, schedule, max_sweeps, tol, precision, json_path) -> dict:
    dp = DataParallel.current(dev)
    with dp.together() if dp is not None else contextlib.nullcontext():
        eng, b, name, settling, given, trained, d = _eval_setup(
            src, dev, schedule, max_sweeps, tol, precision, data, data_dir, resize, channels,
            dataset, split, batch_size)
    s = d.test if split == "test" else d.train
    t0 = time.perf_counter()
    r = _evaluate(eng, s.x, s.y, batch_size=batch_size, max_sweeps=settling["max_sweeps"],
                  tol=settling["tol"], mode=settling["mode"], dp=dp,
                  seed=settling.get("seed", 0))
    r.update({"model": name, "data": d.name, "split": split, "seconds": time.perf_counter() - t0,
              "processes": dp.world if dp is not None else 1,
              "settling": {**settling,
                           "from_training": sorted(k for k, v in given.items()
                                                   if v is None and trained.get(k) is not None)}})
    if json_path and (dp is None or dp.main):
        _write_json(json_path, r)
    if dp is not None:
        dp.barrier("the evaluation's end")
    return r


def _eval_setup(src, dev, schedule, max_sweeps, tol, precision, data, data_dir, resize,
                channels, dataset, split, batch_size):
    eng, b, name = make_engine(src, device=dev, schedule=schedule)
    # a checkpoint settles as its training run did (the test accuracy it reported used
    # these), unless the caller says otherwise
    ts = b.docs.get("train_state")
    trained = dict(ts.get("config", {})) if isinstance(ts, dict) else {}
    if trained.get("precision") == "fp32":     # the default, as a run that did not say
        del trained["precision"]
    given = {"mode": schedule_mode(schedule), "max_sweeps": max_sweeps, "tol": tol,
             "precision": precision}
    # each setting: given, else the training run's, else the bundle's schedule (fp32)
    settling = {}
    for k, own in (("mode", eng.mode), ("max_sweeps", eng.max_sweeps), ("tol", eng.tol),
                   ("precision", "fp32")):
        v = given[k] if given[k] is not None else trained.get(k)
        settling[k] = own if v is None else v
    eng.mode = settling["mode"]
    seed = 0
    if eng.stochastic:
        # a bernoulli network runs each phase for exactly its time steps, and its spikes
        # draw from generators seeded like the training run's test evaluations (its seed,
        # the batch index), so a checkpoint's test accuracy is the one training reported
        bad = next((f for f, v in (("--max-sweeps", max_sweeps), ("--tol", tol))
                    if v is not None), None)
        if bad:
            raise EpcError(f"{name}: {bad} applies to rate neurons (a sweep cap or "
                           f"tolerance); this network's bernoulli neurons run each phase for "
                           f"exactly its time steps ({eng.max_sweeps} free)")
        if settling["precision"] != "fp32":
            raise EpcError(f"{name}: --precision {settling['precision']} applies to rate "
                           f"neurons; this network's bernoulli neurons settle in fp32")
        settling.update(max_sweeps=None, tol=None)
        seed = int(trained.get("seed", 0))
        settling["seed"] = seed
    if settling["precision"] != "fp32":
        eng = Engine(b.graph, device=dev, mode=eng.mode,
                     precision=check_precision(settling["precision"], dev))
    d = _data_for(eng, data, data_dir, resize, channels, dataset)
    s = d.test if split == "test" else d.train
    if int(s.x.shape[0]) == 0:
        raise EpcError(f"{d.name}: the {split} split is empty")
    check_batch_memory(eng, min(batch_size, int(s.x.shape[0])), name)
    return eng, b, name, settling, given, trained, d


def check_gradients(src: Any, *, data: str = "digits", data_dir: str | None = None,
                    resize=None, channels: int | None = None, dataset=None, beta: float = 0.01,
                    nudge: str = "symmetric", samples: int = 64, seed: int = 0,
                    tol: float = 1e-7, max_sweeps: int = 5000, dtype: str = "float64",
                    schedule: str | None = None, freeze_pool: bool = True,
                    seeds: int = 16, estimate: str = "rates",
                    device: str | None = None, threads: int | None = None,
                    json_path: str | None = None) -> dict:
    """Per-coupling comparison of the EP estimate with the implicit-differentiation gradient
    (a bernoulli network: the mean of `seeds` stochastic estimates against its mean-field
    twin's gradient, runtime/gradcheck.py `check_stochastic`)."""
    from .gradcheck import check_gradients as _check
    for k, v in (("beta", beta), ("nudge", nudge), ("samples", samples), ("seed", seed),
                 ("tol", tol), ("max_sweeps", max_sweeps), ("dtype", dtype),
                 ("schedule", schedule), ("seeds", seeds), ("estimate", estimate)):
        if v is None and k not in ("schedule",):
            raise EpcError(f"bad {flags.flag(k)} None: must be {flags.RULES[k].what}")
        flags.check(k, v)
    _device(device)
    configure_process(threads)
    eng, _, name = make_engine(src, device=device, dtype=dtype, schedule=schedule)
    d = _data_for(eng, data, data_dir, resize, channels, dataset)
    if int(d.train.x.shape[0]) == 0:
        raise EpcError(f"{d.name}: the training split is empty")
    # the implicit gradient differentiates through sweeps: more copies than settling
    check_batch_memory(eng, min(samples, int(d.train.x.shape[0])), name,
                       copies=4 * STATE_COPIES, hint="lower --samples, or ")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(d.train.x.shape[0], generator=g)[:samples]
    r = _check(eng, d.train.x[idx], d.train.y[idx], beta=beta, nudge=nudge, tol=tol,
               max_sweeps=max_sweeps, mode=schedule_mode(schedule), freeze_pool=freeze_pool,
               seeds=seeds, seed=seed, estimate=estimate)
    r.update({"model": name, "data": d.name, "seed": seed})
    if json_path:
        _write_json(json_path, r)
    return r


def backprop(src: Any, *, data: str = "digits", data_dir: str | None = None, resize=None,
             channels: int | None = None, dataset=None, epochs: int = 20,
             batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 0.0,
             activations: str = "energy", loss: str = "graph", seed: int = 0,
             device: str | None = None, threads: int | None = None,
             output: str | None = None, onnx: str | None = None,
             metrics_json: str | None = None, progress: Callable | None = None,
             on_epoch: Callable | None = None) -> dict:
    """Train the feedforward form of a compiled graph by backprop from its weights
    (runtime/backprop.py); write the trained weights as a bundle (`output`, target torch)
    and/or the trained feedforward net as an ONNX model (`onnx`, a distillation teacher).

    Metrics: the feedforward net's test accuracy before (`initial`) and after training,
    `history` (one record per epoch), `loss` (the loss minimised: `loss='graph'` takes
    the kind of the graph's label cost, mse or ce, the objective EP fine-tuning goes on
    with), and `converted`: the free phase of the energy
    network holding the trained weights, on the test split (its accuracy before any EP
    step: what warm conversion starts from)."""
    from .backprop import ACTIVATIONS, onnx_bytes, train_feedforward
    for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr),
                 ("weight_decay", weight_decay), ("activations", activations),
                 ("loss", loss), ("seed", seed)):
        flags.check(k, v)
    energy_acts = activations == ACTIVATIONS[0]
    _device(device)
    configure_process(threads)
    eng, base, name = make_engine(src, device=device)
    d = _data_for(eng, data, data_dir, resize, channels, dataset)
    for split, s in (("training", d.train), ("test", d.test)):
        if int(s.x.shape[0]) == 0:
            raise EpcError(f"{d.name}: the {split} split is empty")
    check_batch_memory(eng, min(256, max(int(d.train.x.shape[0]), int(d.test.x.shape[0]))),
                       name)
    weights, m = train_feedforward(eng, d, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                   batch_size=batch_size, seed=seed, energy_acts=energy_acts,
                                   loss=loss, progress=progress, on_epoch=on_epoch)
    with torch.no_grad():
        for k, v in weights.items():
            eng.params[k].copy_(torch.as_tensor(v, device=eng.params[k].device))
    conv = _evaluate(eng, d.test.x, d.test.y, batch_size=256)
    g = eng.graph.copy()
    g.weights.update(weights)
    m.update({"model": name, "data": d.name, "epochs": epochs, "batch_size": batch_size,
              "lr": lr, "weight_decay": weight_decay, "activations": activations,
              "seed": seed, "optimizer": "adam (L2 weight decay), cosine",
              "threads": torch.get_num_threads(), "torch_version": torch.__version__,
              "train_samples": int(d.train.x.shape[0]),
              "test_samples": int(d.test.x.shape[0]),
              "converted": {"test_accuracy": conv["accuracy"], "test_loss": conv["loss"],
                            "unconverged_fraction": conv["unconverged_fraction"],
                            "mean_sweeps": conv["mean_sweeps"]}})
    if output:
        meta = dict(base.meta)
        meta["backprop"] = {k: m[k] for k in ("data", "epochs", "lr", "weight_decay",
                                              "activations", "loss", "seed",
                                              "test_accuracy")}
        from epc.compiler.bundle import write_bundle
        write_bundle(output, Bundle(g, target="torch", meta=meta))
        m["output"] = output
    if onnx:
        atomic_write_bytes(onnx, onnx_bytes(g, energy_acts))
        m["onnx"] = onnx
    if metrics_json:
        _write_json(metrics_json, m)
    return m
