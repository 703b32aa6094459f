"""`epc train`, `epc eval`, `epc check-gradients`: thin typer commands over runtime/api.py.

`register(app)` adds the commands to the epc typer app. Bad input raises EpcError; each
command turns it into one `epc: error: ...` line on stderr and exit status 2 (the same
contract as compiler/cli.main), so nothing half-done is left behind.
"""
from __future__ import annotations

import functools
import json
import math
from typing import Optional

import typer

from epc.compiler.errors import EpcError


_STANDALONE = {"on": False}


def _guard(fn):
    """Standalone (tests, python -m): EpcError -> one line, exit 2. Under epc's main(), the
    error propagates and main() prints it (typer.Exit would be swallowed there)."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except EpcError as e:
            if not _STANDALONE["on"]:
                raise
            typer.echo(f"epc: error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            if not _STANDALONE["on"]:
                raise
            typer.echo("epc: interrupted (the last completed epoch's checkpoint, if any, is "
                       "kept; continue with --resume)", err=True)
            raise typer.Exit(130)
    return wrapper


def _warn_health(r: dict, when: str, samples: str, advice: str = "") -> None:
    """The stderr warning for an evaluation (an epoch record of `epc train`, the result of
    `epc eval`) that found a dead state or a collapsed network."""
    if r.get("dead_states"):
        typer.echo(f"epc: warning: {when}no unit of {', '.join(r['dead_states'])} varies "
                   f"across {samples} (a dead layer passes no signal either way){advice}",
                   err=True)
    elif r.get("constant_prediction") is not None:
        typer.echo(f"epc: warning: {when}every one of {samples} is predicted as class "
                   f"{r['constant_prediction']}: the output no longer depends on the input "
                   f"(the network collapsed)", err=True)


def _neuromorphic(path: str):
    """The neuromorphic API if `path` is a neuromorphic program, else None."""
    try:
        from epc.targets.neuromorphic import api as nm
    except ImportError:
        return None
    try:
        return nm if nm.is_program(path) else None
    except Exception:
        return None


def _progress_bar(epochs: int, quiet: bool):
    """A rich progress bar with live loss/accuracy; returns (callback, context)."""
    if quiet:
        return None, None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    prog = Progress(TextColumn("epoch {task.fields[epoch]}/" + str(epochs)), BarColumn(),
                    MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                    TextColumn("acc {task.fields[acc]:.2%}"), TimeElapsedColumn(),
                    transient=False)
    state = {"task": None, "epoch": -1}

    def cb(epoch, seen, total, loss, acc):
        # started at the first batch, not before the data loads: a run refused for bad
        # input prints its error line alone, without the bar's empty frame
        if not prog.live.is_started:
            prog.start()
        if state["epoch"] != epoch:
            state["epoch"] = epoch
            state["task"] = prog.add_task("train", total=total, epoch=epoch + 1, loss=loss, acc=acc)
        prog.update(state["task"], completed=seen, loss=loss, acc=acc)
    return cb, prog


TRAIN_HELP = """Train a compiled network with Equilibrium Propagation.

Settles each batch free, nudges it symmetrically at +beta/-beta towards the label (and any
tap/teacher costs), and updates every coupling with the local EP estimate.

Example:

  epc compile examples/mlp_digits.onnx --target torch -o mlp.epc

  epc train mlp.epc --data digits --epochs 30 --seed 0 --metrics-json run.json --checkpoint ckpt/

  epc train mlp.epc --epochs 30 --checkpoint ckpt/ --resume   # continue an interrupted run

  epc train r13.epc --data cifar10 --data-dir ~/cifar --augment crop:4,flip --device cuda

  epc train mlp.epc --gradient implicit   # the same model trained by its exact gradient

--gradient implicit replaces the EP estimate by the exact gradient of the loss at the free
fixed point (recurrent backprop, as check-gradients computes it): several times slower, a
reference that tells EP's estimation error apart from what the energy model can learn.

Freed tensor memory stays in the process for the next sweep (glibc: a conv net's settling
no longer page-faults; the metrics' "allocator" says what was in effect, and
EPC_SYSTEM_MALLOC=1 keeps the C library's own behaviour). Results are the same bits.
"""

# one torch thread unless asked: the example nets run as fast or within ~25% on one thread
# of an idle 2-core machine, while more threads than free cores run 10-40x slower (OpenMP
# threads wait on each other), and the count decides the last bits of a run
THREADS_DEFAULT = 1
THREADS_HELP = ("torch CPU threads; 1 makes a run's bits independent of the core count and "
                "is as fast for small nets; raise it for large conv nets on an idle "
                "many-core machine (each count sums in its own order)")

UNSETTLED_WARN = 0.5   # warn when at least this share of an epoch's free phases hit the cap
EXCLUDED_WARN = 0.25   # warn when at least this share of an epoch's samples had no exact gradient

EVAL_HELP = """Evaluate a (trained) bundle: free-phase accuracy, loss and convergence.

A checkpoint of `epc train` settles as its training run did (its --schedule, --max-sweeps
and --tol), so the accuracy it reported is reproduced; give those flags to override.

Example:

  epc eval ckpt/last.epc --data digits
"""

GRAD_HELP = """Compare EP gradient estimates with the true gradient, coupling by coupling.

The true gradient is that of the loss at the free fixed point by implicit differentiation
(adjoint fixed-point iteration through one autograd sweep). Both EP phases are settled
tightly (float64 by default). Prints cosine, norm ratio and sign agreement per coupling.

Example:

  epc check-gradients mlp.epc --data digits --beta 0.01 --json grads.json
"""


def register(app: typer.Typer) -> None:
    @app.command("train", help=TRAIN_HELP)
    @_guard
    def train_cmd(
        model: str = typer.Argument(..., help="bundle (epc compile --target torch) or IR bundle"),
        data: str = typer.Option("digits", help="digits | mnist | fashion-mnist | cifar10 | "
                                  "cifar100 (fashion-mnist without --data-dir: "
                                  "/usr/share/datasets/fashion-mnist)"),
        data_dir: Optional[str] = typer.Option(None, help="directory holding mnist/cifar files"),
        resize: Optional[str] = typer.Option(None, help="resize images to H or HxW (e.g. 32)"),
        channels: Optional[int] = typer.Option(None, help="replicate/average image channels to C"),
        epochs: int = typer.Option(30, help="total epochs of the run"),
        batch_size: int = typer.Option(32, help="samples per EP step"),
        optimizer: str = typer.Option("adam", help="adam | sgd (with --momentum)"),
        lr: float = typer.Option(
            5e-4, help="peak learning rate (digits: 5e-4 to 1e-3 for MLPs, 3e-4 for conv)"),
        momentum: float = typer.Option(0.9, help="SGD momentum"),
        weight_decay: float = typer.Option(
            1e-3, help="L2 weight decay (curbs overfitting of the settled network)"),
        cosine: bool = typer.Option(True, help="cosine learning-rate decay to 0"),
        clip: Optional[float] = typer.Option(None, help="clip the gradient norm to this"),
        beta: Optional[float] = typer.Option(None, help="nudging strength (nonzero) "
                                              "[default: 0.2; a program's own for "
                                              "neuromorphic programs]"),
        lr_shift: Optional[int] = typer.Option(None, "--lr-shift",
                                               help="neuromorphic programs: learning rate "
                                                    "2^-N of on-chip learning [default: the "
                                                    "program's]"),
        output: Optional[str] = typer.Option(None, "-o", "--output",
                                             help="neuromorphic programs: write the trained "
                                                  "program here (float bundles: use "
                                                  "--checkpoint DIR)"),
        nudge: str = typer.Option("symmetric", help="symmetric | one-sided"),
        gradient: str = typer.Option(
            "ep", help="ep (the estimate from the nudged phases) | implicit (the exact "
                       "gradient at the free fixed point, a slower reference; samples whose "
                       "adjoint iteration does not converge are left out of their step's "
                       "gradient and counted)"),
        seed: int = typer.Option(0, help="seed of shuffling (runs are reproducible)"),
        schedule: Optional[str] = typer.Option(None, help="colour | sync (default: compiled)"),
        max_sweeps: Optional[int] = typer.Option(None, help="free-phase sweep cap"),
        nudge_sweeps: Optional[int] = typer.Option(None, help="nudged-phase sweep cap"),
        tol: Optional[float] = typer.Option(None, help="settling tolerance (max |delta s|)"),
        warm_start: bool = typer.Option(False, help="start each sample's free phase from its "
                                                    "last fixed point"),
        freeze_pool: bool = typer.Option(True, help="nudged phases keep the free phase's "
                                                    "max-pool winners"),
        augment: Optional[str] = typer.Option(
            None, help="augment training images [C, H, W]: crop:N (shift by up to N pixels, "
                       "zero fill) and/or flip (mirror left-right, p=1/2), e.g. crop:4,flip "
                       "for CIFAR; train accuracy is then on augmented samples"),
        device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps"),
        threads: int = typer.Option(THREADS_DEFAULT, help=THREADS_HELP),
        checkpoint: Optional[str] = typer.Option(None, help="keep DIR/last.epc (every epoch)"),
        resume: bool = typer.Option(False, help="continue the run in --checkpoint DIR exactly"),
        stop_after: Optional[int] = typer.Option(None, help="stop after N epochs of this "
                                                            "invocation (resume later)"),
        metrics_json: Optional[str] = typer.Option(None, help="write metrics + history here "
                                                    "(rewritten after every epoch)"),
        plot: Optional[str] = typer.Option(None, help="write learning/settling curves (PNG)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ):
        nm = _neuromorphic(model)
        if nm is not None:
            if not hasattr(nm, "train_program"):
                raise EpcError(f"{model}: neuromorphic training is not available in this epc")
            if augment is not None:
                raise EpcError(f"{model}: --augment applies to float bundles; on-chip "
                               f"learning reads the data set as it is")
            if gradient != "ep":
                raise EpcError(f"{model}: --gradient {gradient} applies to float bundles; "
                               f"on-chip learning is EP")
            m = nm.train_program(model, data=data, epochs=epochs, seed=seed,
                                 metrics_json=metrics_json, data_dir=data_dir, resize=resize,
                                 lr_shift=lr_shift, beta=beta, out=output,
                                 batch_size=batch_size, progress=not quiet)
            if isinstance(m, dict):
                typer.echo(_summary(m))
            return
        from .api import train
        if output is not None or lr_shift is not None:
            raise EpcError(f"{model}: --output and --lr-shift apply to neuromorphic programs; "
                           f"a float bundle keeps its trained weights with --checkpoint DIR")
        cb, prog = _progress_bar(epochs, quiet)

        def on_epoch(rec):
            line = (f"epoch {rec['epoch']}: train acc {rec['train_accuracy']:.2%}, test acc "
                    f"{rec['test_accuracy']:.2%}, loss {rec['train_loss']:.4f}, "
                    f"{rec['seconds']:.1f}s, unconverged {rec['unconverged_fraction']:.1%}")
            if prog is not None:
                prog.console.print(line, soft_wrap=True, markup=False)  # whole line in logs
            elif not quiet:
                typer.echo(line)
            _warn_health(rec, f"after epoch {rec['epoch']}, ", "the test samples",
                         "; lower --lr")
            if rec.get("excluded_samples", 0) >= EXCLUDED_WARN * rec.get("samples", math.inf):
                typer.echo(f"epc: warning: in epoch {rec['epoch']}, {rec['excluded_samples']} of "
                           f"{rec['samples']} samples were left out of the implicit gradient "
                           f"and {rec['skipped_steps']} of {rec['steps']} steps applied no "
                           f"update: their adjoint iteration did not converge (the free phase "
                           f"ended off a stable fixed point)", err=True)
            if rec.get("unconverged_fraction", 0.0) >= UNSETTLED_WARN:
                typer.echo(f"epc: warning: in epoch {rec['epoch']}, "
                           f"{rec['unconverged_fraction']:.0%} of the free phases stopped at "
                           f"the sweep cap before the tolerance (EP's estimate, and the "
                           f"implicit gradient, assume settled phases); raise --max-sweeps",
                           err=True)

        kw = dict(data=data, data_dir=data_dir, resize=resize, channels=channels, epochs=epochs,
                  batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum,
                  weight_decay=weight_decay, cosine=cosine, clip=clip,
                  beta=0.2 if beta is None else beta, nudge=nudge, gradient=gradient,
                  seed=seed, schedule=schedule, max_sweeps=max_sweeps,
                  nudge_sweeps=nudge_sweeps, tol=tol, warm_start=warm_start,
                  freeze_pool=freeze_pool, augment=augment, device=device,
                  threads=threads, checkpoint=checkpoint, resume=resume, stop_after=stop_after,
                  metrics_json=metrics_json, plot=plot, progress=cb, on_epoch=on_epoch)
        try:
            m = train(model, **kw)
        finally:
            if prog is not None and prog.live.is_started:
                prog.stop()
        typer.echo(_summary(m))

    @app.command("eval", help=EVAL_HELP)
    @_guard
    def eval_cmd(
        model: str = typer.Argument(..., help="trained bundle (e.g. ckpt/last.epc)"),
        data: str = typer.Option("digits", help="digits | mnist | fashion-mnist | cifar10 | "
                                  "cifar100 (fashion-mnist without --data-dir: "
                                  "/usr/share/datasets/fashion-mnist)"),
        data_dir: Optional[str] = typer.Option(None, help="directory holding mnist/cifar files"),
        resize: Optional[str] = typer.Option(None, help="resize images to H or HxW"),
        channels: Optional[int] = typer.Option(None, help="replicate/average channels to C"),
        split: str = typer.Option("test", help="test | train"),
        batch_size: int = typer.Option(256, help="samples per settle"),
        schedule: Optional[str] = typer.Option(None, help="colour | sync (default: compiled)"),
        max_sweeps: Optional[int] = typer.Option(None, help="sweep cap"),
        tol: Optional[float] = typer.Option(None, help="settling tolerance"),
        device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps"),
        threads: int = typer.Option(THREADS_DEFAULT, help=THREADS_HELP),
        json_out: Optional[str] = typer.Option(None, "--json", help="write the result as JSON"),
    ):
        nm = _neuromorphic(model)
        if nm is not None:
            if not hasattr(nm, "run_program"):
                raise EpcError(f"{model}: the neuromorphic simulator is not available in this epc")
            r = nm.run_program(model, data=data, data_dir=data_dir, resize=resize)
            if isinstance(r, dict):
                typer.echo(json.dumps(r, indent=1, default=str) if json_out is None else "")
                if json_out:
                    from .api import _write_json
                    _write_json(json_out, r)
            return
        from .api import evaluate
        r = evaluate(model, data=data, data_dir=data_dir, resize=resize, channels=channels,
                     split=split, batch_size=batch_size, schedule=schedule,
                     max_sweeps=max_sweeps, tol=tol, device=device, threads=threads,
                     json_path=json_out)
        st = r["settling"]
        flag = {"mode": "schedule", "max_sweeps": "max-sweeps", "tol": "tol"}
        as_trained = ", ".join(f"{flag[k]} {st[k]}" for k in st["from_training"])
        typer.echo(f"{r['model']} on {r['data']} ({r['split']}, {r['samples']} samples): "
                   f"accuracy {r['accuracy']:.2%}, loss {r['loss']:.4f}, mean sweeps "
                   f"{r['mean_sweeps']:.1f}, unconverged {r['unconverged_fraction']:.1%}"
                   + (f" (settled as in training: {as_trained})" if as_trained else ""))
        _warn_health(r, "", "these samples")

    @app.command("check-gradients", help=GRAD_HELP)
    @_guard
    def grads_cmd(
        model: str = typer.Argument(..., help="bundle (torch or IR)"),
        data: str = typer.Option("digits", help="digits | mnist | fashion-mnist | cifar10 | "
                                  "cifar100 (fashion-mnist without --data-dir: "
                                  "/usr/share/datasets/fashion-mnist)"),
        data_dir: Optional[str] = typer.Option(None, help="directory holding mnist/cifar files"),
        resize: Optional[str] = typer.Option(None, help="resize images to H or HxW"),
        channels: Optional[int] = typer.Option(None, help="replicate/average channels to C"),
        beta: float = typer.Option(0.01, help="nudging strength (nonzero)"),
        nudge: str = typer.Option("symmetric", help="symmetric | one-sided"),
        samples: int = typer.Option(64, help="training samples in the batch"),
        seed: int = typer.Option(0, help="seed of the sample choice"),
        tol: float = typer.Option(1e-7, help="settling tolerance of every phase"),
        max_sweeps: int = typer.Option(5000, help="sweep cap of every phase"),
        dtype: str = typer.Option("float64", help="float64 | float32"),
        schedule: Optional[str] = typer.Option(None, help="colour | sync (default: compiled)"),
        freeze_pool: bool = typer.Option(True, help="nudged phases keep the free phase's "
                                                    "max-pool winners"),
        device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps"),
        threads: int = typer.Option(THREADS_DEFAULT, help=THREADS_HELP),
        json_out: Optional[str] = typer.Option(None, "--json", help="write the table as JSON"),
    ):
        from .api import check_gradients
        r = check_gradients(model, data=data, data_dir=data_dir, resize=resize,
                            channels=channels, beta=beta, nudge=nudge, samples=samples,
                            seed=seed, tol=tol, max_sweeps=max_sweeps, dtype=dtype,
                            schedule=schedule, freeze_pool=freeze_pool, device=device,
                            threads=threads, json_path=json_out)
        typer.echo(gradient_table(r))
        for w in r.get("warnings", []):
            typer.echo(f"epc: warning: {w}", err=True)


def gradient_table(r: dict) -> str:
    rows = [("coupling", "kind", "cosine", "norm ratio", "sign agree", "|true|")]
    for c in r["couplings"]:
        rows.append((c["name"], c["kind"], f"{c['cosine']:.5f}", f"{c['norm_ratio']:.4f}",
                     f"{c['sign_agreement']:.3f}", f"{c['true_norm']:.3e}"))
    for b in r["biases"]:
        rows.append((b["name"], "bias", f"{b['cosine']:.5f}", f"{b['norm_ratio']:.4f}",
                     f"{b['sign_agreement']:.3f}", f"{b['true_norm']:.3e}"))
    w = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(x[i].ljust(w[i]) for i in range(len(w))) for x in rows]
    lines.insert(1, "  ".join("-" * k for k in w))
    sw = r["sweeps"]
    lines.append(f"beta={r['beta']} ({r['nudge']}), {r['samples']} samples, {r['dtype']}, "
                 f"sweeps free/+/-: {sw['free']}/{sw['plus']}/{sw['minus']}, unconverged "
                 f"{r['unconverged']}, min cosine {r['min_cosine']:.5f}")
    return "\n".join(lines)


def _summary(m: dict) -> str:
    return (f"trained {m.get('epochs')} epochs in {m.get('seconds', 0):.1f}s: train acc "
            f"{m.get('train_accuracy', 0):.2%}, test acc {m.get('test_accuracy', 0):.2%}, "
            f"unconverged {m.get('unconverged_fraction', 0):.1%}"
            + (f", {m['excluded_samples']} samples left out of the implicit gradient and "
               f"{m.get('skipped_steps', 0)} steps skipped (adjoint iteration not converged)"
               if m.get("excluded_samples") else ""))


def app() -> typer.Typer:
    """A standalone app with just these commands (tests; the epc CLI uses register)."""
    _STANDALONE["on"] = True
    a = typer.Typer(add_completion=False, no_args_is_help=True)
    register(a)
    return a


if __name__ == "__main__":  # python -m epc.runtime.cli
    app()(prog_name="epc")
