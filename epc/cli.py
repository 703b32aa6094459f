"""`epc`: the command line, a thin layer over the Python API (epc/api.py).

Each command parses its flags, calls the API function of the same name with them, and
prints: summary lines, progress, warnings. Options, defaults, checks and error messages
are the API's.

This is also the one error boundary: `EpcGroup.main` turns what escapes a command into
its exit status and one line on stderr:

* an EpcError (bad input: a file, a flag, a model) or a usage error: `epc: error: ...`,
  exit status 2;
* Ctrl-C: `epc: interrupted ...`, exit status 130 (the console script answers it so from
  its first instruction, the imports included: epc/__main__.py);
* anything else is a bug in epc, never passed off as bad input: one `epc: internal
  error ...` line naming the file that holds the traceback, exit status 1
  (EPC_DEBUG=1 lets the traceback through instead).
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile
import traceback
from enum import Enum
from typing import Callable, List, Optional

import typer
from typer.core import TyperGroup

from . import api
from epc.compiler.errors import EpcError

from typer import Abort

try:  # recent typer vendors its own click; older ones use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException
    NoArgsIsHelpError = ()


# --------------------------------------------------------------------------- the boundary
class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past typer (which would turn it into a silent
    exit status 130) to the boundary, with what the command has to say about it."""


class EpcGroup(TyperGroup):
    # click turns a Ctrl-C in its own hands into Abort after printing an empty line: both
    # places it can arrive (parsing the flags, running the command) hand it on as is
    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise _Interrupted(str(e) or "interrupted") from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted(str(e) or "interrupted") from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        code = _guarded(lambda: super(EpcGroup, self).main(
            args=args, prog_name=prog_name or "epc", complete_var=complete_var,
            standalone_mode=False, **extra))
        if standalone_mode:
            sys.exit(code)
        return code


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def _one_line(msg: str) -> str:
    """A message as one line (a file name or a library's reason may hold newlines)."""
    return " ".join(msg.splitlines()) if ("\n" in msg or "\r" in msg) else msg


_console = False      # set by the console script: a second Ctrl-C is then ignored


def _stop_interrupts() -> None:
    """After the first Ctrl-C the command is over: its line is printed and the process
    exits 130 (further Ctrl-Cs would only interrupt that). In-process callers (tests,
    scripts calling main(argv)) keep their own handler."""
    if _console:
        import signal
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:       # not the main thread
            pass


def _internal_error(e: BaseException) -> str:
    """Keep the traceback in a file (the line on the terminal stays one line)."""
    try:
        fd, path = tempfile.mkstemp(prefix="epc-internal-error-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(f"epc {' '.join(sys.argv[1:])}\n\n")
            traceback.print_exception(type(e), e, e.__traceback__, file=f)
        where = f"the traceback is in {path}"
    except OSError:
        where = "rerun with EPC_DEBUG=1 for the traceback"
    first = (str(e).strip().splitlines() or [""])[0]
    return (f"epc: internal error ({type(e).__name__}{': ' + first if first else ''}); "
            f"this is a bug in epc, please report it: {where}")


def _rank() -> int:
    """This process's rank when torchrun started several (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE",
                                                                      "1")) > 1 else 0
    except ValueError:
        return 0


def _guarded(run: Callable[[], object]) -> int:
    try:
        rv = run()
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except EpcError as e:
        # under torchrun every process runs the same command and meets the same bad input:
        # process 0 says it; another says only what happened to it alone (it lost the
        # others, or could not join them)
        if _rank() == 0 or getattr(e, "this_process_only", False):
            _say(_one_line(f"epc: error: {e}"))
        return 2
    except NoArgsIsHelpError as e:     # `epc` or `epc compile` alone: show the help
        if _rank() == 0:
            e.show()
        return 2
    except ClickException as e:        # a usage error: unknown flag, bad value type
        ctx = getattr(e, "ctx", None)
        path = ctx.command_path if ctx is not None else "epc"
        if _rank() == 0:
            _say(_one_line(f"epc: error: {e.format_message()} (see `{path} --help`)"))
        return e.exit_code
    except _Interrupted as e:
        _stop_interrupts()
        if _rank() == 0:
            _say(_one_line(f"epc: {e}"))
        return 130
    except (KeyboardInterrupt, Abort):
        _stop_interrupts()
        if _rank() == 0:
            _say("epc: interrupted")
        return 130
    except Exception as e:             # a bug in epc
        if os.environ.get("EPC_DEBUG", "") not in ("", "0"):
            raise
        _say(_one_line(_internal_error(e)))
        return 1


app = typer.Typer(
    name="epc",
    cls=EpcGroup,
    help="epc compiles feedforward networks (ONNX files, PyTorch modules) into energy-based "
         "networks trained by Equilibrium Propagation, and emits them for a batched PyTorch "
         "runtime or a fixed-point neuromorphic core.\n\n"
         "Typical session:\n\n"
         "  epc compile examples/mlp_digits.onnx --target torch -o mlp.epc --verify\n\n"
         "  epc inspect mlp.epc\n\n"
         "  epc train mlp.epc --data digits --epochs 30\n\n"
         "Accuracies print as percentages; in metrics JSON files (--metrics-json) and in "
         "the Python API's results they are fractions in [0, 1], under keys ending in "
         "'accuracy'. Every command is a function of the Python API with the same options: "
         "`epc compile X --max-sweeps 7` is `epc.compile(X, max_sweeps=7)`.\n\n"
         "Run `epc COMMAND --help` for each command's options and examples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def main(argv: list[str] | None = None) -> int:
    """Run `epc ARGV...` and return its exit status; without `argv`, the command line's
    own arguments, exiting with the status (the `epc` console script and `python -m epc`
    go through epc/__main__.py, which also covers Ctrl-C during start-up)."""
    return _command().main(args=argv, prog_name="epc", standalone_mode=argv is None)


@functools.cache
def _command():
    """The click command typer builds from `app` (once: building it is most of the cost of
    an in-process `main(argv)` that fails early)."""
    return typer.main.get_command(app)


def console() -> int:
    """The console script's run: sys.argv's command, its exit status returned; a Ctrl-C
    from here on is answered once (see _stop_interrupts)."""
    global _console
    _console = True
    return _command().main(args=sys.argv[1:], prog_name="epc", standalone_mode=False)


def pct(x: float | None) -> str:
    """Accuracies print one way: a percentage with two decimals."""
    return "n/a" if x is None else f"{x:.2%}"


# --------------------------------------------------------------------------- compile
def check_report(rep: dict) -> str:
    """`epc compile --check`'s report (api.check's dict) as text."""
    ops = rep["ops"]
    lines = [f"compatibility of {rep['source']} ({rep['frontend']} frontend, target "
             f"{rep['target']}):",
             f"  translated: {sum(ops.values())} ops"
             + (": " + ", ".join(f"{k} x{n}" for k, n in ops.items()) if ops else "")]
    bad = rep["unsupported"]
    if bad:
        lines.append(f"  unsupported: {sum(u['count'] for u in bad)} ops of {len(bad)} "
                     f"kind{'s' if len(bad) > 1 else ''}:")
        for u in bad:
            sub = " [--substitute replaces it]" if u["substitutable"] else ""
            lines.append(f"    {u['op']} x{u['count']} (first: {u['first']}): {u['reason']}{sub}")
    if rep["substituted"]:
        lines.append(f"  substituted: {rep['substituted']}")
    if rep["compiled"]:
        c = rep["compiled"]
        lines.append(f"  compiled: {c['states']} states, {c['couplings']} couplings, "
                     f"{c['parameters']:,} parameters")
    if rep["error"] and not bad:
        lines.append(f"  refused: {rep['error']}")
    if bad:
        lines.append(f"  supported: {rep['supported']}")
    lines.append(f"  verdict: {'compatible' if rep['compatible'] else 'not compatible'}")
    return "\n".join(lines) + "\n"


NO_DATA_DIR = "none: digits is built in, fashion-mnist read from where Debian installs it"
# the data options train, eval, check-gradients and backprop share
DATA_DIR_OPT = typer.Option(None, help="directory holding mnist/cifar files",
                            show_default=NO_DATA_DIR)
RESIZE_OPT = typer.Option(None, help="resize images to H or HxW (e.g. 32)",
                          show_default="the data set's own")
CHANNELS_OPT = typer.Option(None, help="replicate/average image channels to C",
                            show_default="the data set's own")


class Target(str, Enum):
    ir = "ir"
    torch = "torch"
    neuromorphic = "neuromorphic"


class Format(str, Enum):
    text = "text"
    json = "json"
    dot = "dot"


# The compiler's options, shared by `compile` and `opt` (one definition, one help text)
INPUT_SHAPE_OPT = typer.Option(None, "--input-shape",
                               help="Input shape for a PyTorch spec, batch "
                                    "first, e.g. 1,3,32,32.",
                               show_default="none: a spec needs one")
ACTIVATION_OPT = typer.Option("clip:1.0", "--activation",
                              help="What a ReLU becomes: clip:C = clip(u, 0, C) "
                                   "(Hopfield-ResNet), clip:LO:HI, hardsigmoid, relu.")
FEEDBACK_OPT = typer.Option(True, "--feedback/--no-feedback",
                            help="Tie a transpose feedback to every coupling (EP needs "
                                 "it; --no-feedback is for debugging).")
POOL_FIRST_OPT = typer.Option(None, "--pool-first/--no-pool-first",
                              help="Move each max-pool in front of its activation "
                                   "(same function): states are the pooled maps, and "
                                   "max-pool winners no longer flip while settling "
                                   "(docs/findings.md, digits). Not given: on for "
                                   "--neuron bernoulli (the max of drives, not of noisy "
                                   "rate estimates; docs/stochep.md), off for rate.",
                              show_default="on for bernoulli, off for rate")
COST_OPT = typer.Option("mse", "--cost", help="Label cost on the linear output: mse | ce.")
READOUT_OPT = typer.Option(False, "--readout",
                           help="Take the output (and tap) heads out of the energy: "
                                "a linear readout of the last hidden state, no "
                                "feedback, its cost nudging that state (Laborieux et "
                                "al. 2021 use it with --cost ce). torch target only.")
TAPS_OPT = typer.Option(None, "--taps",
                        help="Auxiliary error taps: 'auto' or comma-separated "
                             "state names (see `epc inspect`).",
                        show_default="none")
TAP_WEIGHT_OPT = typer.Option(0.3, "--tap-weight", help="Cost weight of each tap.")
TEACHER_OPT = typer.Option(None, "--teacher",
                           help="Knowledge distillation: 'source' (the model "
                                "being compiled, frozen) or a teacher ONNX file.",
                           show_default="none")
TEMPERATURE_OPT = typer.Option(4.0, "--temperature", help="Distillation temperature.")
MIX_OPT = typer.Option(0.5, "--mix", help="Share of the teacher cost in the output cost.")
NEURON_OPT = typer.Option("rate", "--neuron",
                          help="Neuron model: rate (deterministic) | bernoulli (StochEP: "
                               "binary spikes fired with probability rho(u), which must lie "
                               "in [0, 1]; neighbours see each neuron's running firing-rate "
                               "estimate). A linear output stays rate. On a compiled input, "
                               "bernoulli makes its neurons spiking (weights kept). With "
                               "--target neuromorphic: spiking groups of the program (its "
                               "trace needs --averaging trace:2^K).")
TIME_STEPS_OPT = typer.Option(None, "--time-steps",
                              help="bernoulli: time steps of the free phase (each one sweep; "
                                   "a stochastic phase runs exactly this many: it has no "
                                   "tolerance).",
                              show_default="by depth: 64 with one hidden state on the "
                                           "longest path, 64 x H with H >= 2 (printed in "
                                           "the IR); a compiled input keeps its own")
NUDGE_TIME_STEPS_OPT = typer.Option(None, "--nudge-time-steps",
                                    help="bernoulli: time steps of each nudged phase (the "
                                         "nudge must reach the first layer within them: "
                                         "deeper nets need more, which the default gives).",
                                    show_default="by depth: 32 with one hidden state, 64 x H "
                                                 "with H >= 2; a compiled input keeps its "
                                                 "own")
AVERAGING_OPT = typer.Option(None, "--averaging",
                             help="bernoulli: the firing-rate estimate neighbours see: "
                                  "trace:T (exponential trace, r += (spike - r) / T) or "
                                  "window:W (mean of the last W spikes).",
                             show_default="by depth: trace:8 with one hidden state, "
                                          "trace:4 with more; a compiled input keeps its own")
SAMPLING_OPT = typer.Option(None, "--sampling",
                            help="bernoulli: the nudged phases' random numbers: shared "
                                 "(both continue the free phase's stream, so +beta and "
                                 "-beta differ by the nudge alone) | independent.",
                            show_default="shared; a compiled input keeps its own")
IDENTITY_SKIP_OPT = typer.Option("identity", "--identity-skip",
                                 help="Same-shape residual skips: identity (no weights) "
                                      "| learned (1x1, initialised to the identity).")
SKIP_GAIN_OPT = typer.Option(
    1.0, "--skip-gain",
    help="Scale every skip between two states by G at initialisation (identity skips "
         "become learned maps G*I). With feedback, a ResNet's skips chain its states "
         "both ways; at gain 1 a chain of 3+ is non-convex and the states saturate "
         "(docs/findings.md, deep nets); G < 0.55 keeps a chain of 6 convex. 1 = the source "
         "model's function (what --verify checks).")
FEEDBACK_GAIN_OPT = typer.Option(
    "auto", "--feedback-gain",
    help="Feedback regulation: the tied feedback of a coupling from depth d to d+k drives "
         "its source at gain R^k (R in (0, 1]); EP's estimate is corrected for it. auto: "
         "1 up to one hidden layer (two when states are coupled by convolutions), 0.1 "
         "deeper; 1 on --target neuromorphic, with --readout and with --neuron bernoulli "
         "(python -m bench.depth "
         "measured it). 1 = symmetric feedback.")
SCHEDULE_OPT = typer.Option(None, "--schedule",
                            help="colour: block updates by colour class; "
                                 "sync: all at once.",
                            show_default="colour; a compiled input keeps its "
                                         "own")
MAX_SWEEPS_OPT = typer.Option(None, "--max-sweeps", help="Free-phase sweep cap.",
                              show_default="100; a compiled input keeps its "
                                           "own")
NUDGE_SWEEPS_OPT = typer.Option(None, "--nudge-sweeps",
                                help="Sweep cap of each nudged phase.",
                                show_default="40; a compiled input keeps its "
                                             "own")
TOL_OPT = typer.Option(None, "--tol",
                       help="Settling tolerance, max |delta s|.",
                       show_default="1e-4; a compiled input keeps its own")
MEMORY_LIMIT_OPT = typer.Option(
    None, "--memory-limit",
    help="Memory an input may make epc use beyond its own bytes (decompressed bundle "
         "members, seeded weights, folded ONNX constants, a program's memories, the states "
         "of a batch, resized data), e.g. 4G: estimated and refused before it is taken. "
         "Raise it for a big model or batch you trust.",
    show_default="1G, or $EPC_MEMORY_LIMIT")
PRINT_AFTER_ALL_OPT = typer.Option(False, "--print-after-all",
                                   help="Print the IR after every pass that runs (to "
                                        "stdout); a pass that changes nothing prints one "
                                        "line.")


@app.command("compile")
def compile_cmd(
    source: str = typer.Argument(..., help="An ONNX file, an epc bundle (.epc, e.g. a trained "
                                 "checkpoint), or a PyTorch spec `pkg.module:factory` / "
                                 "`file.py:factory` (imported only on request, needs "
                                 "--input-shape)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Output file.",
                                         show_default="SOURCE's stem + .epc, or .nc for "
                                                      "--target neuromorphic, in the current "
                                                      "directory"),
    target: Target = typer.Option(Target.ir, "--target", "-t",
                                  help="ir: the compiled IR bundle; torch: a bundle for the "
                                       "PyTorch EP runtime; neuromorphic: a fixed-point program."),
    verify: bool = typer.Option(False, "--verify", help="Check that one feedforward sweep of "
                                "the compiled graph (feedback off, bounds lifted) reproduces "
                                "the source model (onnxruntime / PyTorch) on random inputs; "
                                "fail above 1e-4 relative error."),
    input_shape: Optional[str] = INPUT_SHAPE_OPT,
    activation: str = ACTIVATION_OPT,
    feedback: bool = FEEDBACK_OPT,
    pool_first: Optional[bool] = POOL_FIRST_OPT,
    cost: str = COST_OPT,
    readout: bool = READOUT_OPT,
    taps: Optional[str] = TAPS_OPT,
    tap_weight: float = TAP_WEIGHT_OPT,
    teacher: Optional[str] = TEACHER_OPT,
    temperature: float = TEMPERATURE_OPT,
    mix: float = MIX_OPT,
    neuron: str = NEURON_OPT,
    time_steps: Optional[int] = TIME_STEPS_OPT,
    nudge_time_steps: Optional[int] = NUDGE_TIME_STEPS_OPT,
    averaging: Optional[str] = AVERAGING_OPT,
    sampling: Optional[str] = SAMPLING_OPT,
    identity_skip: str = IDENTITY_SKIP_OPT,
    skip_gain: float = SKIP_GAIN_OPT,
    feedback_gain: str = FEEDBACK_GAIN_OPT,
    schedule: Optional[str] = SCHEDULE_OPT,
    max_sweeps: Optional[int] = MAX_SWEEPS_OPT,
    nudge_sweeps: Optional[int] = NUDGE_SWEEPS_OPT,
    tol: Optional[float] = TOL_OPT,
    print_after_all: bool = PRINT_AFTER_ALL_OPT,
    print_after: Optional[List[str]] = typer.Option(None, "--print-after",
                                                    help="Print the IR after pass NAME "
                                                         "(repeatable).",
                                                    show_default="none"),
    weight_bits: int = typer.Option(8, "--weight-bits",
                                    help="neuromorphic: weight mantissa bits (4-8)."),
    frac_bits: int = typer.Option(8, "--frac-bits",
                                  help="neuromorphic: fractional bits of states (1.0 = 2^F)."),
    per_channel: bool = typer.Option(False, "--per-channel",
                                     help="neuromorphic: one weight exponent per output channel."),
    calibrate: Optional[str] = typer.Option(None, "--calibrate",
                                            help="neuromorphic: choose scales on real "
                                                 "activations of this data set (e.g. digits).",
                                            show_default="none: scales from the weights alone"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir",
                                           help="Data directory for --calibrate (mnist, cifar).",
                                           show_default=NO_DATA_DIR),
    resize: Optional[int] = typer.Option(None, "--resize",
                                         help="Resize calibration images to this size.",
                                         show_default="the data set's own"),
    memory_limit: Optional[str] = MEMORY_LIMIT_OPT,
    substitute: bool = typer.Option(
        False, "--substitute",
        help="Compile the nearest EP-compatible network: smooth activations become "
             "piecewise-linear (SiLU, HardSwish, GELU, Mish, Softplus, ELU, LeakyReLU -> the "
             "clipped ReLU; Sigmoid -> a hard sigmoid; Tanh -> clip to [-1, 1]) and "
             "squeeze-excitation gates are dropped. Says what changed; --verify then "
             "reports the deviation from the source instead of failing."),
    check: bool = typer.Option(
        False, "--check",
        help="Print the compatibility report (every op: translated or refused, with "
             "counts and first nodes; then the compiler passes and, for --target "
             "neuromorphic, the core) and write nothing; exit status 2 if incompatible."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line."),
):
    """Compile a feedforward network into an EP energy graph (and optionally a target).

    Examples:

      epc compile examples/resnet13.onnx -o r13.epc --verify

      epc compile my_model.onnx --taps auto --teacher source --print-after-all

      epc compile mypkg.models:resnet --input-shape 1,3,32,32 -o r.epc

      epc compile examples/mlp_digits.onnx --target torch -o mlp.epc

      epc compile mlp.epc --target neuromorphic --weight-bits 4 --calibrate digits -o mlp4.nc

      epc compile efficientnet_b0.onnx --check --substitute
    """
    # the compile options, one set for both: `--check` reports on them, otherwise compile
    opts = dict(
        target=target.value, verify=verify, input_shape=input_shape,
        activation=activation, feedback=feedback, pool_first=pool_first, cost=cost,
        readout=readout, taps=taps, tap_weight=tap_weight, teacher=teacher,
        temperature=temperature, mix=mix, neuron=neuron, time_steps=time_steps,
        nudge_time_steps=nudge_time_steps, averaging=averaging, sampling=sampling,
        identity_skip=identity_skip, skip_gain=skip_gain, feedback_gain=feedback_gain,
        schedule=schedule, max_sweeps=max_sweeps, nudge_sweeps=nudge_sweeps, tol=tol,
        print_after_all=print_after_all,
        print_after=print_after, weight_bits=weight_bits, frac_bits=frac_bits,
        per_channel=per_channel, calibrate=calibrate, data_dir=data_dir, resize=resize,
        memory_limit=memory_limit, substitute=substitute)
    if check:
        rep = api.check(source, output=output, **opts)
        typer.echo(check_report(rep), nl=False)
        if not rep["compatible"]:
            raise EpcError(rep["error"])
        return
    out_path = output or api.default_output(source, target.value)
    res = api.compile_result(source, output=out_path, **opts)
    for w in res.warnings:
        _say(f"epc: warning: {w}")
    if quiet:
        return
    g = res.graph
    where = out_path if output else (f"{out_path} (no -o given: SOURCE's stem, in "
                                     f"{os.getcwd()})")
    msg = (f"epc: wrote {where}: {len(g.states)} states, {len(g.couplings)} couplings, "
           f"{g.num_parameters():,} parameters, "
           f"{len(g.schedule.classes) if g.schedule else 0} colours ({res.seconds:.2f} s)")
    sp = g.schedule.spiking if g.schedule is not None else None
    if sp is not None:     # the spiking schedule (flags given, else by depth)
        msg += (f"; bernoulli: {sp.time_steps}/{sp.nudge_time_steps} time steps, "
                f"{sp.averaging}:{sp.tau}, {sp.sampling} sampling")
    v = res.verify
    if v is not None and v.substituted:
        msg += (f"; verify: the substituted network deviates from the source: max relative "
                f"error {v.error:.3g}, the same class on {pct(v.agreement)} of {v.samples} "
                f"random inputs")
    elif v is not None:
        msg += f"; verify: max relative error {v.error:.2e} (limit 1e-4) OK"
    _say(msg)
    if res.substituted:
        _say(f"epc: note: --substitute changed the network: {res.substituted}")
    if target == Target.torch:
        from epc.compiler.passes.residual import unit_gain_skips
        skips = [f"{c.src}->{c.dst}" for c in unit_gain_skips(g)]
        if skips:
            more = ", ..." if len(skips) > 3 else ""
            _say(f"epc: note: {len(skips)} identity skip(s) of gain 1 join states "
                 f"({', '.join(skips[:3])}{more}); with symmetric feedback, chained skips of "
                 f"gain 1 make the energy non-convex; EP training of the ResNet-13 example "
                 f"collapsed at gain 1 but learned with --skip-gain 0.5 (docs/findings.md, deep nets)")


# --------------------------------------------------------------------------- opt
@app.command("opt")
def opt_cmd(
    source: str = typer.Argument(..., help="IR text (.epir), an epc bundle, an ONNX file or a "
                                 "PyTorch spec `pkg.module:factory` (with --input-shape)."),
    passes: Optional[List[str]] = typer.Option(None, "--pass", "-p",
                                               help="A pass to run (repeatable, in the order "
                                                    "given): canonicalize, pool_first, "
                                                    "to_energy, symmetrize, residual, taps, "
                                                    "teacher, readout, schedule.",
                                               show_default="the whole pipeline, as compile "
                                                            "runs it"),
    output: Optional[str] = typer.Option(None, "-o", "--output",
                                         help="Also write the resulting IR text here.",
                                         show_default="stdout only"),
    weights: str = typer.Option("seeded", "--weights",
                                    help="How the text writes weights: shapes (declarations "
                                         "only), seeded (also `= seeded(N)` recipes while the "
                                         "data is what they make), inline (every value)."),
    input_shape: Optional[str] = INPUT_SHAPE_OPT,
    activation: str = ACTIVATION_OPT,
    feedback: bool = FEEDBACK_OPT,
    pool_first: Optional[bool] = POOL_FIRST_OPT,
    cost: str = COST_OPT,
    readout: bool = READOUT_OPT,
    taps: Optional[str] = TAPS_OPT,
    tap_weight: float = TAP_WEIGHT_OPT,
    teacher: Optional[str] = TEACHER_OPT,
    temperature: float = TEMPERATURE_OPT,
    mix: float = MIX_OPT,
    neuron: str = NEURON_OPT,
    time_steps: Optional[int] = TIME_STEPS_OPT,
    nudge_time_steps: Optional[int] = NUDGE_TIME_STEPS_OPT,
    averaging: Optional[str] = AVERAGING_OPT,
    sampling: Optional[str] = SAMPLING_OPT,
    identity_skip: str = IDENTITY_SKIP_OPT,
    skip_gain: float = SKIP_GAIN_OPT,
    feedback_gain: str = FEEDBACK_GAIN_OPT,
    schedule: Optional[str] = SCHEDULE_OPT,
    max_sweeps: Optional[int] = MAX_SWEEPS_OPT,
    nudge_sweeps: Optional[int] = NUDGE_SWEEPS_OPT,
    tol: Optional[float] = TOL_OPT,
    print_after_all: bool = PRINT_AFTER_ALL_OPT,
    memory_limit: Optional[str] = MEMORY_LIMIT_OPT,
):
    """Run compiler passes on a graph and print the resulting IR text.

    The compiler's workbench: each pass's tests in tests/passes/*.epir are `epc opt` runs.

    A pass that the options leave off is refused (--pass pool_first needs --pool-first);
    each pass's preconditions are checked and its result verified.

    Examples:

      epc opt tests/passes/residual_skips.epir --pass residual

      epc opt net.epir --pass to_energy --pass symmetrize --weights inline

      epc opt examples/mlp_digits.onnx --pass canonicalize

      epc opt examples/resnet13.onnx --print-after-all --weights shapes > passes.txt
    """
    text = api.opt(source, passes=passes, output=output, weights=weights,
                   input_shape=input_shape, activation=activation, feedback=feedback,
                   pool_first=pool_first, cost=cost, readout=readout, taps=taps,
                   tap_weight=tap_weight, teacher=teacher, temperature=temperature, mix=mix,
                   neuron=neuron, time_steps=time_steps, nudge_time_steps=nudge_time_steps,
                   averaging=averaging, sampling=sampling, identity_skip=identity_skip,
                   skip_gain=skip_gain, feedback_gain=feedback_gain,
                   schedule=schedule, max_sweeps=max_sweeps, nudge_sweeps=nudge_sweeps,
                   tol=tol, print_after_all=print_after_all, memory_limit=memory_limit)
    sys.stdout.write(text)


# --------------------------------------------------------------------------- inspect
@app.command("inspect")
def inspect_cmd(
    path: str = typer.Argument(..., help="An epc bundle (.epc), an IR text file, or a "
                                         "neuromorphic program (.nc, .nca)."),
    fmt: Format = typer.Option(Format.text, "--format", "-f",
                               help="text: the IR (parses back exactly); json: for scripts; "
                                    "dot: Graphviz. A program prints as text (its assembly "
                                    "and resources) or json."),
    stats: bool = typer.Option(False, "--stats",
                               help="States, couplings by kind, parameters, colours, MACs "
                                    "per sweep (with --format json: added as 'stats'). A "
                                    "program always shows its resources."),
    memory_limit: Optional[str] = MEMORY_LIMIT_OPT,
):
    """Print a compiled graph: the textual IR, JSON or Graphviz DOT.

    Examples:

      epc inspect r13.epc

      epc inspect r13.epc --format json | python -m json.tool

      epc inspect r13.epc --format dot > r13.dot && dot -Tpng r13.dot -o r13.png

      epc inspect r13.epc --stats

      epc inspect mlp.nc
    """
    sys.stdout.write(api.inspect(path, format=fmt.value, stats=stats,
                                 memory_limit=memory_limit))


# --------------------------------------------------------------------------- train
# one torch thread unless asked: the example nets run as fast or within ~25% on one thread
# of an idle 2-core machine, while more threads than free cores run 10-40x slower (OpenMP
# threads wait on each other), and the count decides the last bits of a run
PRECISION_HELP = ("fp32 | bf16 | fp16 (float bundles): the settle loop's states and its copy "
                  "of the weights in 16 bits; drives summed and activated in float32, the "
                  "stop test and the EP difference in float32, float32 master weights. "
                  "Meant for GPUs. On a CPU without 16-bit arithmetic units, bf16 ran "
                  "0.65x to 1.9x float32's speed (faster only where its looser stop, tol "
                  "+ one bf16 ulp, saves sweeps) and fp16 2x to 5x slower (docs)")
THREADS_HELP = ("torch CPU threads; 1 makes a run's bits independent of the core count and "
                "is as fast for small nets; raise it for large conv nets on an idle "
                "many-core machine (each count sums in its own order)")
DATA_HELP = ("digits (built in) | mnist | fashion-mnist | cifar10 | cifar100 (from "
             "--data-dir; fashion-mnist without one: /usr/share/datasets/fashion-mnist)")
AS_COMPILED = "the bundle's compiled schedule"

UNSETTLED_WARN = 0.5   # warn when at least this share of an epoch's free phases hit the cap
EXCLUDED_WARN = 0.25   # warn when at least this share of an epoch's samples had no exact gradient

TRAIN_HELP = """Train a compiled network with Equilibrium Propagation.

Settles each batch free, nudges it symmetrically at +beta/-beta towards the label (and any
tap/teacher costs), and updates every coupling with the local EP estimate. Prints one line
per epoch (with a progress bar on a terminal) and a summary; --metrics-json keeps every
figure (accuracies as fractions).

Example:

  epc compile examples/mlp_digits.onnx --target torch -o mlp.epc

  epc train mlp.epc --data digits --epochs 30 --seed 0 --metrics-json run.json --checkpoint ckpt/

  epc train mlp.epc --epochs 30 --checkpoint ckpt/ --resume   # continue an interrupted run

  epc train r13.epc --data cifar10 --data-dir ~/cifar --augment crop:4,flip --device cuda

  epc train mlp.epc --gradient implicit   # the same model trained by its exact gradient

  epc train mlp.nc --epochs 10 --lr-shift 10 -o mlp_trained.nc   # on-chip learning

Warm start by backprop (--backprop-epochs N|auto): N epochs of BACKPROP on the graph's
feedforward form (the source architecture with the energy form's bounded activations, the
graph's label cost, Adam at --backprop-lr, cosine; the same data and seed) come before the
EP epochs, which then fine-tune those weights (after a warm start the EP --lr defaults to
1e-4 instead of 5e-4). auto runs 30 where cold EP is measured not to train the graph: skip
couplings between states (ResNets, Hopfield-ResNet13) or more than 4 convolutional hidden
states (6-conv VGG), under regulated feedback; 0 elsewhere. Digits, 10 EP epochs, cold EP /
warm: Hopfield-ResNet13 6.94 / 98.06%, 6-conv VGG 96.11 / 99.17%, skip ResNet 96.67 /
99.44% (python -m bench.depth --toggles warm; warm EP at 2e-4). The run prints the test accuracy before anything, after backprop, and of the
converted energy network before any EP step; its recipe line says which it did and why.

  epc train r13.epc --backprop-epochs 0        # EP alone, from the compiled weights

--gradient implicit replaces the EP estimate by the exact gradient of the loss at the free
fixed point (recurrent backprop, as check-gradients computes it): several times slower, a
reference that tells EP's estimation error apart from what the energy model can learn.

A neuromorphic program (.nc, .nca) learns on chip, in the integer simulator: it takes
--data, --data-dir, --resize, --epochs, --batch-size, --beta, --lr-shift, -o, --seed,
--threads, --metrics-json, --divergence and --memory-limit; the other options are the
float runtime's.

A divergence watch checks every epoch: a NaN/Inf loss, a train loss over 10x that of the
run's first batch (e.g. --lr 1e3), or a test accuracy back at chance (the most frequent
class's share) after reaching half-way from chance to 100%. With --divergence stop (the
default) the run ends there, exit status 2, naming the epoch; the checkpoint keeps the
epoch before and --metrics-json says "diverged". With --divergence warn it prints a
warning and goes on (the metrics' "divergence_warnings").

Freed tensor memory stays in the process for the next sweep (glibc: a conv net's settling
no longer page-faults; the metrics' "allocator" says what was in effect, and
EPC_SYSTEM_MALLOC=1 keeps the C library's own behaviour). Results are the same bits.
"""


def _warn_health(r: dict, when: str, samples: str, advice: str = "") -> None:
    """The stderr warning for an evaluation (an epoch record of `epc train`, the result of
    `epc eval`) that found a dead state or a collapsed network."""
    if r.get("dead_states"):
        _say(f"epc: warning: {when}no unit of {', '.join(r['dead_states'])} varies "
             f"across {samples} (a dead layer passes no signal either way){advice}")
    elif r.get("constant_prediction") is not None:
        _say(f"epc: warning: {when}every one of {samples} is predicted as class "
             f"{r['constant_prediction']}: the output no longer depends on the input "
             f"(the network collapsed)")


class _EpochDisplay:
    """What `epc train` shows while it runs: one line per epoch on stdout and, on a
    terminal, a progress bar for the epoch under way (erased when it ends). Piped to a
    file, the lines alone: a bar there would print every epoch a second time."""

    def __init__(self, epochs: int, quiet: bool):
        self.quiet, self.prog, self.task = quiet, None, None
        if quiet:
            return
        from rich.console import Console
        console = Console()
        if not console.is_terminal:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)
        self.prog = Progress(TextColumn("epoch {task.fields[epoch]}/" + str(epochs)),
                             BarColumn(), MofNCompleteColumn(),
                             TextColumn("loss {task.fields[loss]:.4f}"),
                             TextColumn("acc {task.fields[acc]:.2%}"), TimeElapsedColumn(),
                             console=console, transient=True)

    def batch(self, epoch: int, seen: int, total: int, loss: float, acc: float) -> None:
        if self.prog is None:
            return
        # started at the first batch, not before the data loads: a run refused for bad
        # input prints its error line alone, without the bar's empty frame
        if not self.prog.live.is_started:
            self.prog.start()
        if self.task is None:
            self.task = self.prog.add_task("train", total=total, epoch=epoch + 1, loss=loss,
                                           acc=acc)
        self.prog.update(self.task, completed=seen, total=total, epoch=epoch + 1, loss=loss,
                         acc=acc)

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.prog is not None:
            if self.task is not None:         # the epoch's bar gives way to its line
                self.prog.remove_task(self.task)
                self.task = None
            self.prog.console.print(text, soft_wrap=True, markup=False, highlight=False)
        else:
            typer.echo(text)

    def close(self) -> None:
        if self.prog is not None and self.prog.live.is_started:
            self.prog.stop()


def _float_epoch(show: _EpochDisplay) -> Callable[[dict], None]:
    def on_epoch(rec: dict) -> None:
        if rec.get("phase") == "backprop":       # a warm start's epochs (not EP)
            show.line(f"backprop epoch {rec['epoch']}: train acc "
                      f"{pct(rec['train_accuracy'])}, test acc {pct(rec['test_accuracy'])}, "
                      f"loss {rec['train_loss']:.4f}, {rec['seconds']:.1f}s")
            return
        show.line(f"epoch {rec['epoch']}: train acc {pct(rec['train_accuracy'])}, test acc "
                  f"{pct(rec['test_accuracy'])}, loss {rec['train_loss']:.4f}, "
                  f"{rec['seconds']:.1f}s, unconverged {rec['unconverged_fraction']:.1%}")
        if "divergence_warning" in rec:
            _say(f"epc: warning: {rec['divergence_warning']}")
        _warn_health(rec, f"after epoch {rec['epoch']}, ", "the test samples", "; lower --lr")
        if rec.get("excluded_samples", 0) >= EXCLUDED_WARN * rec.get("samples", math.inf):
            _say(f"epc: warning: in epoch {rec['epoch']}, {rec['excluded_samples']} of "
                 f"{rec['samples']} samples were left out of the implicit gradient "
                 f"and {rec['skipped_steps']} of {rec['steps']} steps applied no "
                 f"update: their adjoint iteration did not converge (the free phase "
                 f"ended off a stable fixed point)")
        if rec.get("unconverged_fraction", 0.0) >= UNSETTLED_WARN:
            _say(f"epc: warning: in epoch {rec['epoch']}, "
                 f"{rec['unconverged_fraction']:.0%} of the free phases stopped at "
                 f"the sweep cap before the tolerance (EP's estimate, and the "
                 f"implicit gradient, assume settled phases); raise --max-sweeps")
    return on_epoch


def _program_epoch(show: _EpochDisplay, epochs: int) -> Callable[[dict], None]:
    def on_epoch(rec: dict) -> None:
        show.line(f"epoch {rec['epoch']}/{epochs}: train acc {pct(rec['train_accuracy'])}, "
                  f"test acc {pct(rec['test_accuracy'])}, {rec['seconds']:.1f}s, "
                  f"unsettled {rec['unsettled_train']}")
        if "divergence_warning" in rec:
            _say(f"epc: warning: {rec['divergence_warning']}")
    return on_epoch


def _train_summary(m: dict) -> str:
    init, warm = m.get("initial"), m.get("warm_start")
    before = (f" (before any EP step {pct(init['test_accuracy'])})" if init and not warm
              else "")
    if warm:
        before = (f" (before anything {pct(init['test_accuracy'])}; after "
                  f"{warm['epochs']} backprop epochs {pct(warm['test_accuracy'])}, converted "
                  f"to EP before any EP step "
                  f"{pct(m['converted']['test_accuracy']) if m.get('converted') else '-'})")
    return (f"trained {m.get('epochs')} {'EP ' if warm else ''}epochs in "
            f"{m.get('seconds', 0):.1f}s: train acc "
            f"{pct(m.get('train_accuracy'))}, test acc {pct(m.get('test_accuracy'))}"
            + before + ", "
            f"unconverged {m.get('unconverged_fraction', 0):.1%}"
            + (f", {m['excluded_samples']} samples left out of the implicit gradient and "
               f"{m.get('skipped_steps', 0)} steps skipped (adjoint iteration not converged)"
               if m.get("excluded_samples") else "")
            + (f"; bernoulli: {m['time_steps']} time steps, spike rate {m['spike_rate']:.4f}, "
               f"{m['synaptic_events_per_inference']:,.0f} synaptic events per inference"
               if "spike_rate" in m else "")
            + (f"\n{_recipe_line(m['recipe'])}" if m.get("recipe") else ""))


def _recipe_line(r: dict) -> str:
    """The depth recipe the run used (metrics JSON: `recipe`), as the flags that set it."""
    fb = ("symmetric feedback (feedback gain 1)" if not r["regulated_couplings"] else
          f"feedback gain {r['feedback_gain']:g} a level on {r['regulated_couplings']} "
          f"couplings")
    n = r["hidden_states"]
    lr = (f", lr {r['lr']:g}" + (f" ({r['lr_rule']})" if r.get("lr_rule") else "")
          if "lr" in r else "")
    rates = r.get("layer_learning_rates") or []
    # (every level at --lr, whatever --layer-lrs said: the rate the user gave, not repeated)
    lrs = ("" if len(set(rates)) <= 1 and r.get("layer_lrs", "none") in ("none", "auto") else
           f", layer learning rates {'/'.join(f'{x:g}' for x in rates)} "
           f"(--layer-lrs {r['layer_lrs']})")
    warm = ""
    if r.get("backprop_epochs"):
        warm = (f"; warm start: {r['backprop_epochs']} backprop epochs (lr "
                f"{r['backprop_lr']:g}) before EP"
                + (f" ({r['warm_start_rule']})" if r.get("warm_start_rule") else ""))
    elif "backprop_epochs" in r:
        warm = "; no warm start" + (f" ({r['warm_start_rule']})" if r.get("warm_start_rule")
                                    else "")
    return (f"recipe: {n} hidden state{'s' if n != 1 else ''}, {fb}, weight decay "
            f"{r['weight_decay']:g} ({r['weight_decay_form']}){lr}{lrs}{warm}")


def _program_train_summary(m: dict) -> str:
    return (f"trained {m['epochs']} epochs on chip in {m['seconds']:.1f}s: train acc "
            f"{pct(m.get('train_accuracy'))}, test acc {pct(m['test_accuracy'])}, "
            f"unsettled {m['unsettled']} of {m['samples']} test samples, weight saturations "
            f"{m['weight_saturations']}"
            + (f"; bernoulli: {m['time_steps']} time steps, spike rate {m['spike_rate']:.4f}, "
               f"{m['synaptic_events_per_inference']:,.0f} synaptic events (additions) per "
               f"inference" if "spike_rate" in m else "")
            + (f"; wrote {m['out']}" if m.get("out") else ""))


@app.command("train", help=TRAIN_HELP)
def train_cmd(
    model: str = typer.Argument(..., help="A bundle (epc compile --target torch, or an IR "
                                          "bundle) or a neuromorphic program (.nc, .nca)."),
    data: str = typer.Option("digits", help=DATA_HELP),
    data_dir: Optional[str] = DATA_DIR_OPT,
    resize: Optional[str] = RESIZE_OPT,
    channels: Optional[int] = CHANNELS_OPT,
    epochs: int = typer.Option(30, help="total epochs of the run"),
    batch_size: int = typer.Option(32, help="samples per EP step"),
    optimizer: str = typer.Option("adam", help="adam | sgd (with --momentum)"),
    lr: Optional[float] = typer.Option(
        None, help="peak EP learning rate (digits: 5e-4 to 1e-3 for MLPs, 3e-4 for conv)",
        show_default="5e-4; 1e-4 after a backprop warm start"),
    momentum: float = typer.Option(0.9, help="SGD momentum"),
    weight_decay: float = typer.Option(
        1e-3, help="weight decay (curbs overfitting of the settled network); its form: "
                   "--decoupled-wd / --l2-wd"),
    decoupled_wd: bool = typer.Option(
        True, "--decoupled-wd/--l2-wd",
        help="decoupled: --weight-decay shrinks the weights by lr*wd a step (AdamW); "
             "l2: it is an L2 term added to the gradient, which Adam normalises, so "
             "small-gradient weights shrink ~lr a step: MLPs with 8 hidden layers collapse "
             "to one class at wd 1e-3 (bench.depth: 8.3% against 96.1% decoupled)"),
    cosine: bool = typer.Option(True, help="cosine learning-rate decay to 0"),
    clip: Optional[float] = typer.Option(None, help="clip the gradient norm to this",
                                         show_default="no clipping"),
    beta: Optional[float] = typer.Option(None, help="nudging strength (nonzero)",
                                         show_default="0.2; a neuromorphic program's own"),
    lr_shift: Optional[int] = typer.Option(None, "--lr-shift",
                                           help="neuromorphic programs: learning rate 2^-N "
                                                "of on-chip learning",
                                           show_default="the program's"),
    output: Optional[str] = typer.Option(None, "-o", "--output",
                                         help="neuromorphic programs: write the trained "
                                              "program here (float bundles: use "
                                              "--checkpoint DIR)",
                                         show_default="not written"),
    nudge: str = typer.Option("symmetric", help="symmetric | one-sided"),
    nudge_form: str = typer.Option(
        "states", help="states | deviation: settle the nudged phases as deviations from "
                       "the free fixed point, which resolves the small nudge of deep states "
                       "under --feedback-gain in float32 (MLPs)"),
    gradient: str = typer.Option(
        "ep", help="ep (the estimate from the nudged phases) | implicit (the exact "
                   "gradient at the free fixed point, a slower reference; samples whose "
                   "adjoint iteration does not converge are left out of their step's "
                   "gradient and counted)"),
    estimate: str = typer.Option(
        "rates", help="bernoulli neurons: the EP update from the nudged phases' firing-rate "
                      "estimates (rates) or from their spike trains (spikes: co-spike "
                      "counts over the averaged time steps)"),
    layer_lrs: str = typer.Option(
        "auto", help="learning rate per depth level of the graph, as factors on --lr: none "
                     "(one rate), auto (sqrt(256/fan-in) on dense levels whose units sum "
                     "more than 256 inputs, e.g. a 784-pixel input layer; 1 elsewhere), or "
                     "F1,...,FL, one per level from the input side to the output (e.g. "
                     "1,0.5 for one hidden layer); the recipe line prints rates that "
                     "differ"),
    seed: int = typer.Option(0, help="seed of shuffling and of bernoulli neurons' spikes "
                                     "(runs are reproducible)"),
    schedule: Optional[str] = typer.Option(None, help="colour | sync",
                                           show_default=AS_COMPILED),
    max_sweeps: Optional[int] = typer.Option(None, help="free-phase sweep cap",
                                             show_default=AS_COMPILED),
    nudge_sweeps: Optional[int] = typer.Option(None, help="nudged-phase sweep cap",
                                               show_default=AS_COMPILED),
    tol: Optional[float] = typer.Option(None, help="settling tolerance (max |delta s|)",
                                        show_default=AS_COMPILED),
    warm_start: bool = typer.Option(False, help="start each sample's free phase from its "
                                                "last fixed point"),
    freeze_pool: bool = typer.Option(True, help="nudged phases keep the free phase's "
                                                "max-pool winners"),
    augment: Optional[str] = typer.Option(
        None, help="augment training images [C, H, W]: crop:N (shift by up to N pixels, "
                   "zero fill) and/or flip (mirror left-right, p=1/2), e.g. crop:4,flip "
                   "for CIFAR; train accuracy is then on augmented samples",
        show_default="none"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps"),
    threads: int = typer.Option(1, help=THREADS_HELP),
    checkpoint: Optional[str] = typer.Option(None, help="keep DIR/last.epc (every epoch)",
                                             show_default="none"),
    resume: bool = typer.Option(False, help="continue the run in --checkpoint DIR exactly"),
    stop_after: Optional[int] = typer.Option(None, help="stop after N epochs of this "
                                                        "invocation (resume later)",
                                             show_default="run to --epochs"),
    metrics_json: Optional[str] = typer.Option(None, help="write metrics + history here "
                                                          "(rewritten after every epoch; "
                                                          "accuracies as fractions)",
                                               show_default="none"),
    plot: Optional[str] = typer.Option(None, help="write learning/settling curves (PNG)",
                                       show_default="none"),
    divergence: str = typer.Option(
        "stop", help="stop | warn: what the divergence watch does after an epoch whose loss "
                     "is NaN/Inf or over 10x its first batch's, or whose test accuracy fell "
                     "back to chance after a healthy start (stop: exit status 2, the "
                     "checkpoint keeps the epoch before; warn: a warning line, and the "
                     "metrics' divergence_warnings)"),
    memory_limit: Optional[str] = MEMORY_LIMIT_OPT,
    dist_timeout: float = typer.Option(
        300.0, help="data-parallel runs under torchrun: seconds a collective waits for the "
                    "other processes before the run stops with an error (a process that "
                    "died or hangs)"),
    precision: str = typer.Option(
        "fp32", help=PRECISION_HELP),
    backprop_epochs: str = typer.Option(
        "auto", help="N | auto: epochs of BACKPROP on the graph's feedforward form before "
                     "the EP epochs (a warm start; EP then fine-tunes). auto: 30 on graphs "
                     "where cold EP is measured to fail (skips between states, or more than "
                     "4 convolutional hidden states), 0 elsewhere"),
    backprop_lr: float = typer.Option(
        2e-3, help="peak Adam learning rate of the --backprop-epochs (cosine decay to 0)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress (epoch lines, bar)"),
):
    program = api.is_program(model)
    show = _EpochDisplay(epochs, quiet)
    try:
        m = api.train(
            model, data=data, data_dir=data_dir, resize=resize, channels=channels,
            epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
            momentum=momentum, weight_decay=weight_decay, decoupled_wd=decoupled_wd,
            cosine=cosine, clip=clip, beta=beta, lr_shift=lr_shift, output=output,
            nudge=nudge, nudge_form=nudge_form, gradient=gradient, estimate=estimate,
            layer_lrs=layer_lrs, seed=seed, schedule=schedule, max_sweeps=max_sweeps,
            nudge_sweeps=nudge_sweeps, tol=tol, warm_start=warm_start,
            freeze_pool=freeze_pool, augment=augment,
            device=device, threads=threads, checkpoint=checkpoint, resume=resume,
            stop_after=stop_after, metrics_json=metrics_json, plot=plot,
            divergence=divergence, memory_limit=memory_limit, dist_timeout=dist_timeout,
            precision=precision, backprop_epochs=backprop_epochs, backprop_lr=backprop_lr,
            progress=None if program else show.batch,
            on_epoch=_program_epoch(show, epochs) if program else _float_epoch(show))
    except KeyboardInterrupt:
        show.close()
        if checkpoint and not program:
            raise KeyboardInterrupt(f"interrupted; {os.path.join(checkpoint, 'last.epc')} "
                                    f"holds the last completed epoch, if any: continue "
                                    f"with --resume")
        raise
    finally:
        show.close()
    if _rank() == 0:       # (under torchrun, process 0 reports for the run)
        typer.echo(_program_train_summary(m) if program else _train_summary(m))


# --------------------------------------------------------------------------- backprop
BACKPROP_HELP = """Train a compiled network's feedforward form by backprop, from its weights.

The feedforward form is the source architecture the bundle was compiled from: every state
computed once, in order, from its inbound couplings, no feedback (teacher states are
skipped). It is trained with the graph's label cost (mse or ce, as compiled with --cost: the
objective EP fine-tuning goes on with; --loss to choose), Adam (L2 weight decay) and a
cosine decay to 0.
Prints one line per epoch and a summary with the test accuracy of the feedforward net and
of the converted energy network (its EP free phase with the trained weights, before any EP
step: what a warm start of `epc train` begins with).

Example:

  epc compile examples/mlp3_digits.onnx --target torch -o mlp3.epc

  epc backprop mlp3.epc --data digits --epochs 20 -o mlp3_bp.epc --onnx mlp3_teacher.onnx

  epc train mlp3_bp.epc --epochs 5     # warm conversion: EP fine-tuning

  epc compile examples/mlp3_digits.onnx --target torch --teacher mlp3_teacher.onnx

--activations energy (the default) trains with the compiled graph's bounded activations
(e.g. clip(0, 1)), the function EP's free phase computes when feedback is weak; source
trains with the source model's (e.g. ReLU). --onnx writes the trained feedforward net as an
ONNX model (input 'input', output 'logits'), with those activations.

Warm conversion needs feedback regulation (epc compile's default, --feedback-gain auto):
measured on digits, 3/5-hidden MLPs and 4/6-conv VGG nets converted at gain auto kept backprop's
accuracy within 1.7 points before any EP step and EP fine-tuning held or raised it; at
gain 1 the converted nets lost up to 66 points, or did not settle, and EP fine-tuning from
there made them worse. The cost must match too: weights trained for cross-entropy under
an MSE-compiled graph collapsed in EP fine-tuning (hence --loss graph).
"""


@app.command("backprop", help=BACKPROP_HELP)
def backprop_cmd(
    model: str = typer.Argument(..., help="A compiled bundle (epc compile --target torch, "
                                          "an IR bundle, or a checkpoint of epc train)."),
    data: str = typer.Option("digits", help=DATA_HELP),
    data_dir: Optional[str] = DATA_DIR_OPT,
    resize: Optional[str] = RESIZE_OPT,
    channels: Optional[int] = CHANNELS_OPT,
    epochs: int = typer.Option(20, help="epochs of backprop"),
    batch_size: int = typer.Option(32, help="samples per step"),
    lr: float = typer.Option(2e-3, help="peak Adam learning rate (cosine decay to 0)"),
    weight_decay: float = typer.Option(0.0, help="L2 weight decay"),
    activations: str = typer.Option(
        "energy", help="energy (the compiled graph's bounded activations, what EP's free "
                       "phase computes) | source (the source model's, e.g. ReLU)"),
    loss: str = typer.Option(
        "graph", help="graph (the compiled graph's label cost, mse or ce: the objective EP "
                      "fine-tuning goes on with) | ce | mse (0.5 ||s - onehot||^2)"),
    seed: int = typer.Option(0, help="seed of shuffling (runs are reproducible)"),
    output: Optional[str] = typer.Option(None, "-o", "--output",
                                         help="write the bundle with the trained weights "
                                              "here (for epc train)",
                                         show_default="not written"),
    onnx: Optional[str] = typer.Option(None, "--onnx",
                                       help="write the trained feedforward net here as "
                                            "ONNX (for epc compile --teacher)",
                                       show_default="not written"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps"),
    threads: int = typer.Option(1, help=THREADS_HELP),
    metrics_json: Optional[str] = typer.Option(None, help="write metrics + history here "
                                                          "(accuracies as fractions)",
                                               show_default="none"),
    memory_limit: Optional[str] = MEMORY_LIMIT_OPT,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress (epoch lines, bar)"),
):
    show = _EpochDisplay(epochs, quiet)

    def on_epoch(rec: dict) -> None:
        show.line(f"epoch {rec['epoch']}: train acc {pct(rec['train_accuracy'])}, test acc "
                  f"{pct(rec['test_accuracy'])}, loss {rec['train_loss']:.4f}, "
                  f"{rec['seconds']:.1f}s")
    try:
        m = api.backprop(model, data=data, data_dir=data_dir, resize=resize,
                         channels=channels, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, activations=activations, loss=loss,
                         seed=seed,
                         output=output, onnx=onnx, device=device, threads=threads,
                         metrics_json=metrics_json, memory_limit=memory_limit,
                         progress=show.batch, on_epoch=on_epoch)
    finally:
        show.close()
    c = m["converted"]
    wrote = [f for f in (m.get("output"), m.get("onnx")) if f]
    typer.echo(f"backprop {m['epochs']} epochs in {m['seconds']:.1f}s: test acc "
               f"{pct(m['initial']['test_accuracy'])} -> {pct(m['test_accuracy'])} "
               f"(train {pct(m['train_accuracy'])}); converted to EP, before any EP step: "
               f"test acc {pct(c['test_accuracy'])}, unconverged "
               f"{c['unconverged_fraction']:.1%}"
               + (f"; wrote {' and '.join(wrote)}" if wrote else ""))


# --------------------------------------------------------------------------- eval
EVAL_HELP = """Evaluate a (trained) bundle: free-phase accuracy, loss and convergence.

A checkpoint of `epc train` settles as its training run did (its --schedule, --max-sweeps
and --tol), so the accuracy it reported is reproduced; give those flags to override. A
neuromorphic program is run in the integer simulator on the test split (as `epc run`).

Example:

  epc eval ckpt/last.epc --data digits

  epc eval ckpt/last.epc --metrics-json eval.json
"""
AS_TRAINED = "as trained, else the bundle's compiled schedule"


@app.command("eval", help=EVAL_HELP)
def eval_cmd(
    model: str = typer.Argument(..., help="A trained bundle (e.g. ckpt/last.epc) or a "
                                          "neuromorphic program."),
    data: str = typer.Option("digits", help=DATA_HELP),
    data_dir: Optional[str] = DATA_DIR_OPT,
    resize: Optional[str] = RESIZE_OPT,
    channels: Optional[int] = CHANNELS_OPT,
    split: str = typer.Option("test", help="test | train"),
    batch_size: int = typer.Option(256, help="samples per settle"),
    schedule: Optional[str] = typer.Option(None, help="colour | sync", show_default=AS_TRAINED),
    max_sweeps: Optional[int] = typer.Option(None, help="sweep cap", show_default=AS_TRAINED),
    tol: Optional[float] = typer.Option(None, help="settling tolerance",
                                        show_default=AS_TRAINED),
    precision: Optional[str] = typer.Option(None, help="fp32 | bf16 | fp16: the settle "
                                            "loop's dtype (see epc train --help)",
                                            show_default="as trained, else fp32"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps"),
    threads: int = typer.Option(1, help=THREADS_HELP),
    metrics_json: Optional[str] = typer.Option(None, "--metrics-json", "--json",
                                               help="write the result as JSON (accuracy as "
                                                    "a fraction)",
                                               show_default="none"),
    memory_limit: Optional[str] = MEMORY_LIMIT_OPT,
):
    r = api.evaluate(model, data=data, data_dir=data_dir, resize=resize, channels=channels,
                     split=split, batch_size=batch_size, schedule=schedule,
                     max_sweeps=max_sweeps, tol=tol, precision=precision, device=device,
                     threads=threads, metrics_json=metrics_json, memory_limit=memory_limit)
    if _rank() != 0:                 # under torchrun, process 0 reports for the run
        return
    if "settling" not in r:          # a neuromorphic program, in the simulator
        typer.echo(f"{model} on {data} (test, {r['samples']} samples, integer simulator): "
                   f"accuracy {pct(r['accuracy'])}, sweeps max {r['max_sweeps']} median "
                   f"{r['median_sweeps']:g}, unsettled {r['unsettled']} (cycling "
                   f"{r['cycling']}), overflows {r['overflows']}")
        return
    st = r["settling"]
    flag = {"mode": "schedule", "max_sweeps": "max-sweeps", "tol": "tol", "precision": "precision"}
    as_trained = ", ".join(f"{flag[k]} {st[k]}" for k in st["from_training"])
    typer.echo(f"{r['model']} on {r['data']} ({r['split']}, {r['samples']} samples): "
               f"accuracy {pct(r['accuracy'])}, loss {r['loss']:.4f}, mean sweeps "
               f"{r['mean_sweeps']:.1f}, unconverged {r['unconverged_fraction']:.1%}"
               + (f" (settled as in training: {as_trained})" if as_trained else ""))
    if "spike_rate" in r:
        typer.echo(f"  bernoulli neurons: {r['time_steps']} time steps, spike rate "
                   f"{r['spike_rate']:.4f}, per inference "
                   f"{r['synaptic_events_per_inference']:,.0f} synaptic events and "
                   f"{r['multiply_adds_per_inference']:,.0f} multiply-adds (spikes seeded "
                   f"with {st['seed']})")
    _warn_health(r, "", "these samples")


# --------------------------------------------------------------------------- check-gradients
GRAD_HELP = """Compare EP gradient estimates with the true gradient, coupling by coupling.

The true gradient is that of the loss at the free fixed point by implicit differentiation
(adjoint fixed-point iteration through one autograd sweep). Both EP phases are settled
tightly (float64 by default). Prints cosine, norm ratio and sign agreement per coupling.

A network with bernoulli (spiking) neurons: its EP estimate is random, so --seeds K
estimates, each as training computes it (the free and nudged phases of the network's time
steps), are averaged; the reference is the gradient of its mean-field twin (the same
network with rate neurons). The table adds the single estimates' cosine (mean +- std) and
the mean's relative standard error. Give it the training --beta (0.2): the sampling noise
of the difference of the nudged phases grows as 1/beta (digits MLP at initialisation, K=16:
min cosine 0.996 at beta 0.2, 0.62 at beta 0.01 with K=4).

Example:

  epc check-gradients mlp.epc --data digits --beta 0.01 --metrics-json grads.json
"""


def gradient_table(r: dict) -> str:
    st = r.get("stochastic")
    rows = [("coupling", "kind", "cosine", "norm ratio", "sign agree", "|true|")
            + (("single cosine", "rel. std err") if st else ())]

    def more(c: dict) -> tuple:
        return ((f"{c['single_cosine_mean']:.3f} +- {c['single_cosine_std']:.3f}",
                 f"{c['relative_std_error']:.3f}") if st else ())
    for c in r["couplings"]:
        rows.append((c["name"], c["kind"], f"{c['cosine']:.5f}", f"{c['norm_ratio']:.4f}",
                     f"{c['sign_agreement']:.3f}", f"{c['true_norm']:.3e}") + more(c))
    for b in r["biases"]:
        rows.append((b["name"], "bias", f"{b['cosine']:.5f}", f"{b['norm_ratio']:.4f}",
                     f"{b['sign_agreement']:.3f}", f"{b['true_norm']:.3e}") + more(b))
    w = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(x[i].ljust(w[i]) for i in range(len(w))) for x in rows]
    lines.insert(1, "  ".join("-" * k for k in w))
    sw = r["sweeps"]
    lines.append(f"beta={r['beta']} ({r['nudge']}), {r['samples']} samples, {r['dtype']}, "
                 f"sweeps free/+/-: {sw['free']}/{sw['plus']}/{sw['minus']}, unconverged "
                 f"{r['unconverged']}, min cosine {r['min_cosine']:.5f}")
    if st:
        lines[-1] = (f"beta={r['beta']} ({r['nudge']}), {r['samples']} samples, {r['dtype']}: "
                     f"mean of K={st['seeds']} stochastic estimates ({st['estimate']}; time "
                     f"steps {st['time_steps']}/{st['nudge_time_steps']}, {st['averaging']}:"
                     f"{st['tau']}, {st['sampling']} noise) against the mean-field gradient, "
                     f"min cosine {r['min_cosine']:.5f}")
    return "\n".join(lines)


@app.command("check-gradients", help=GRAD_HELP)
def grads_cmd(
    model: str = typer.Argument(..., help="A bundle (torch or IR)."),
    data: str = typer.Option("digits", help=DATA_HELP),
    data_dir: Optional[str] = DATA_DIR_OPT,
    resize: Optional[str] = RESIZE_OPT,
    channels: Optional[int] = CHANNELS_OPT,
    beta: float = typer.Option(0.01, help="nudging strength (nonzero)"),
    nudge: str = typer.Option("symmetric", help="symmetric | one-sided"),
    samples: int = typer.Option(64, help="training samples in the batch"),
    seed: int = typer.Option(0, help="seed of the sample choice"),
    tol: float = typer.Option(1e-7, help="settling tolerance of every phase"),
    max_sweeps: int = typer.Option(5000, help="sweep cap of every phase"),
    dtype: str = typer.Option("float64", help="float64 | float32"),
    schedule: Optional[str] = typer.Option(None, help="colour | sync",
                                           show_default=AS_COMPILED),
    freeze_pool: bool = typer.Option(True, help="nudged phases keep the free phase's "
                                                "max-pool winners"),
    seeds: int = typer.Option(16, help="bernoulli neurons: stochastic EP estimates "
                                       "averaged (K; the table compares their mean, and "
                                       "gives the single estimates' spread)"),
    estimate: str = typer.Option("rates", help="bernoulli neurons: rates | spikes (as "
                                               "epc train --estimate)"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | mps"),
    threads: int = typer.Option(1, help=THREADS_HELP),
    metrics_json: Optional[str] = typer.Option(None, "--metrics-json", "--json",
                                               help="write the table as JSON",
                                               show_default="none"),
    memory_limit: Optional[str] = MEMORY_LIMIT_OPT,
):
    r = api.check_gradients(model, data=data, data_dir=data_dir, resize=resize,
                            channels=channels, beta=beta, nudge=nudge, samples=samples,
                            seed=seed, tol=tol, max_sweeps=max_sweeps, dtype=dtype,
                            schedule=schedule, freeze_pool=freeze_pool, seeds=seeds,
                            estimate=estimate, device=device,
                            threads=threads, metrics_json=metrics_json,
                            memory_limit=memory_limit)
    typer.echo(gradient_table(r))
    for w in r.get("warnings", []):
        _say(f"epc: warning: {w}")


# --------------------------------------------------------------------------- run
@app.command("run")
def run_cmd(
    program: str = typer.Argument(..., help="A neuromorphic program: binary (.nc, from "
                                  "`epc compile --target neuromorphic`) or assembly text "
                                  "(.nca)."),
    data: str = typer.Option("digits", "--data", help=DATA_HELP),
    data_dir: Optional[str] = typer.Option(None, "--data-dir",
                                           help="Directory holding mnist/cifar files.",
                                           show_default=NO_DATA_DIR),
    resize: Optional[str] = typer.Option(None, "--resize", help="Resize images to H or "
                                         "HxW to fit the program's input (e.g. 32).",
                                         show_default="the data set's own"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N test "
                                        "samples (quick checks of big programs).",
                                        show_default="all"),
    batch_size: int = typer.Option(256, "--batch-size", help="Samples simulated together "
                                   "(results do not depend on it: each sample settles "
                                   "on its own)."),
    metrics_json: Optional[str] = typer.Option(None, "--metrics-json",
                                               help="Write the metrics (test_accuracy as a "
                                                    "fraction, max_sweeps, median_sweeps, "
                                                    "unsettled, overflows, resources, ...) "
                                                    "as JSON.",
                                               show_default="none"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout."),
    memory_limit: Optional[str] = MEMORY_LIMIT_OPT,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line."),
):
    """Run a neuromorphic program's inference in the bit-exact integer simulator.

    Each test sample is clamped to the input memory (x * 2^F, rounded), every neuron
    group starts at 0, and the free phase sweeps the colour classes until no state
    changes (the integer fixed point), a state repeats (a cycle) or the sweep cap.
    The prediction is the output group's argmax. Reported: accuracy, sweeps to the
    fixed point (max, median), samples that did not settle (and how many cycled),
    saturation counts, memory bytes and synaptic operations. A program with bernoulli
    (spiking) groups runs exactly its time steps and predicts from the output's mean
    over their second half; it also reports the spike rate and the synaptic events
    (additions) per inference beside its multiply-adds (docs/isa.md, Spikes).

    Examples:

      epc compile examples/mlp_digits.onnx --target neuromorphic -o mlp.nc

      epc run mlp.nc --data digits

      epc run r13.nc --data cifar10 --data-dir ~/data --limit 64 --metrics-json m.json

      epc run digits_conv.nc --data mnist --data-dir ~/mnist --resize 8
    """
    m = api.run(program, data=data, data_dir=data_dir, resize=resize, limit=limit,
                batch_size=batch_size, metrics_json=metrics_json, memory_limit=memory_limit)
    if not quiet:
        _say(f"epc run: {program}: accuracy {pct(m['test_accuracy'])} on {m['samples']} "
             f"samples, sweeps max {m['max_sweeps']} median {m['median_sweeps']:g}, "
             f"unsettled {m['unsettled']} (cycling {m['cycling']}), overflows "
             f"{m['overflows']}, {m['seconds']:.2f} s"
             + (f"; bernoulli: {m['time_steps']} time steps, spike rate "
                f"{m['spike_rate']:.4f}, per inference {m['synaptic_events_per_inference']:,.0f}"
                f" synaptic events (additions) and {m['multiply_adds_per_inference']:,.0f} "
                f"multiply-adds" if "spike_rate" in m else ""))
    if as_json:
        typer.echo(json.dumps(m, indent=1, default=str))


if __name__ == "__main__":  # python -m epc.cli
    main()
