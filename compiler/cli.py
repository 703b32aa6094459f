"""`epc`: the command-line driver (a thin layer over the Python API).

Every user error is an EpcError, printed as one line `epc: error: ...` on stderr with exit
status 2. Commands for the runtime (train, eval, check-gradients) and the neuromorphic
target (run) register themselves from their own packages.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .errors import EpcError

app = typer.Typer(
    name="epc",
    help="epc compiles feedforward networks (ONNX files, PyTorch modules) into energy-based "
         "networks trained by Equilibrium Propagation, and emits them for a batched PyTorch "
         "runtime or a fixed-point neuromorphic core.\n\n"
         "Typical session:\n\n"
         "  epc compile examples/mlp_digits.onnx -o mlp.epc --verify\n\n"
         "  epc inspect mlp.epc\n\n"
         "  epc train mlp.epc --data digits --epochs 30\n\n"
         "Run `epc COMMAND --help` for each command's options and examples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


class Target(str, Enum):
    ir = "ir"
    torch = "torch"
    neuromorphic = "neuromorphic"


class Format(str, Enum):
    text = "text"
    json = "json"
    dot = "dot"


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def _parse_shape(spec: str | None) -> tuple[int, ...] | None:
    if spec is None:
        return None
    try:
        dims = tuple(int(d) for d in spec.replace("x", ",").split(","))
    except ValueError:
        raise EpcError(f"bad --input-shape {spec!r}: use comma-separated integers, e.g. 1,3,32,32")
    if not dims or any(d <= 0 for d in dims):
        raise EpcError(f"bad --input-shape {spec!r}: dimensions must be positive")
    return dims


def _default_output(src: str, target: Target) -> str:
    stem = Path(src.split(":")[0]).stem if ":" in src and not os.path.exists(src) else Path(src).stem
    return stem + (".nc" if target == Target.neuromorphic else ".epc")


@app.command("compile")
def compile_cmd(
    source: str = typer.Argument(..., help="An ONNX file, an epc bundle (.epc, e.g. a trained "
                                 "checkpoint), or a PyTorch spec `pkg.module:factory` / "
                                 "`file.py:factory` (imported only on request, needs --input-shape)."),
    output: Optional[str] = typer.Option(None, "-o", "--output",
                                         help="Output file [default: SOURCE stem + .epc, or .nc "
                                              "for --target neuromorphic]."),
    target: Target = typer.Option(Target.ir, "--target", "-t",
                                  help="ir: the compiled IR bundle; torch: a bundle for the "
                                       "PyTorch EP runtime; neuromorphic: a fixed-point program."),
    verify: bool = typer.Option(False, "--verify", help="Check that one feedforward sweep of "
                                "the compiled graph (feedback off, bounds lifted) reproduces "
                                "the source model (onnxruntime / PyTorch) on random inputs; "
                                "fail above 1e-4 relative error."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape",
                                              help="Input shape for a PyTorch spec, batch "
                                                   "first, e.g. 1,3,32,32."),
    activation: str = typer.Option("clip:1.0", "--activation",
                                    help="What a ReLU becomes: clip:C = clip(u, 0, C) "
                                         "(Hopfield-ResNet), clip:LO:HI, hardsigmoid, relu."),
    feedback: bool = typer.Option(True, "--feedback/--no-feedback",
                                  help="Tie a transpose feedback to every coupling (EP needs "
                                       "it; --no-feedback is for debugging)."),
    pool_first: bool = typer.Option(False, "--pool-first",
                                    help="Move each max-pool in front of its activation "
                                         "(same function): states are the pooled maps, and "
                                         "max-pool winners no longer flip while settling "
                                         "(see README, conv nets)."),
    cost: str = typer.Option("mse", "--cost", help="Label cost on the linear output: mse | ce."),
    readout: bool = typer.Option(False, "--readout",
                                 help="Take the output (and tap) heads out of the energy: "
                                      "a linear readout of the last hidden state, no "
                                      "feedback, its cost nudging that state (Laborieux et "
                                      "al. 2021 use it with --cost ce). torch target only."),
    taps: Optional[str] = typer.Option(None, "--taps",
                                       help="Auxiliary error taps: 'auto' or comma-separated "
                                            "state names (see `epc inspect`)."),
    tap_weight: float = typer.Option(0.3, "--tap-weight", help="Cost weight of each tap."),
    teacher: Optional[str] = typer.Option(None, "--teacher",
                                          help="Knowledge distillation: 'source' (the model "
                                               "being compiled, frozen) or a teacher ONNX file."),
    temperature: float = typer.Option(4.0, "--temperature", help="Distillation temperature."),
    mix: float = typer.Option(0.5, "--mix", help="Share of the teacher cost in the output cost."),
    neuron: str = typer.Option("rate", "--neuron",
                               help="Neuron model: rate (deterministic) | bernoulli (StochEP)."),
    identity_skip: str = typer.Option("identity", "--identity-skip",
                                      help="Same-shape residual skips: identity (no weights) "
                                           "| learned (1x1, initialised to the identity)."),
    skip_gain: float = typer.Option(
        1.0, "--skip-gain",
        help="Scale every skip between two states by G at initialisation (identity skips "
             "become learned maps G*I). With feedback, a ResNet's skips chain its states "
             "both ways; at gain 1 a chain of 3+ is non-convex and the states saturate "
             "(README: ResNet-13); G < 0.55 keeps a chain of 6 convex. 1 = the source "
             "model's function (what --verify checks)."),
    schedule: Optional[str] = typer.Option(None, "--schedule",
                                           help="colour: block updates by colour class "
                                                "[default]; sync: all at once."),
    max_sweeps: Optional[int] = typer.Option(None, "--max-sweeps",
                                             help="Free-phase sweep cap [default: 100]."),
    nudge_sweeps: Optional[int] = typer.Option(None, "--nudge-sweeps",
                                               help="Sweep cap of each nudged phase "
                                                    "[default: 40]."),
    tol: Optional[float] = typer.Option(None, "--tol",
                                        help="Settling tolerance, max |delta s| "
                                             "[default: 1e-4]."),
    print_after_all: bool = typer.Option(False, "--print-after-all",
                                         help="Print the IR after every pass (to stdout)."),
    print_after: Optional[List[str]] = typer.Option(None, "--print-after",
                                                    help="Print the IR after pass NAME "
                                                         "(repeatable)."),
    weight_bits: int = typer.Option(8, "--weight-bits",
                                    help="neuromorphic: weight mantissa bits (4-8)."),
    frac_bits: int = typer.Option(8, "--frac-bits",
                                  help="neuromorphic: fractional bits of states (1.0 = 2^F)."),
    per_channel: bool = typer.Option(False, "--per-channel",
                                     help="neuromorphic: one weight exponent per output channel."),
    calibrate: Optional[str] = typer.Option(None, "--calibrate",
                                            help="neuromorphic: choose scales on real "
                                                 "activations of this data set (e.g. digits)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Data directory for --calibrate."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Resize calibration images."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line."),
):
    """Compile a feedforward network into an EP energy graph (and optionally a target).

    Examples:

      epc compile examples/resnet13.onnx -o r13.epc --verify

      epc compile my_model.onnx --taps auto --teacher source --print-after-all

      epc compile mypkg.models:resnet --input-shape 1,3,32,32 -o r.epc

      epc compile examples/mlp_digits.onnx --target torch -o mlp.epc

      epc compile mlp.epc --target neuromorphic --weight-bits 4 --calibrate digits -o mlp4.nc
    """
    from .options import CompileOptions, parse_activation
    from .passes.residual import unit_gain_skips
    from .pipeline import compile_source

    # option values are checked by CompileOptions.check() (shared with the Python API).
    # Given explicitly, these also override the schedule of an already compiled input.
    sched = {k: v for k, v in (("mode", "colour" if schedule == "color" else schedule),
                               ("max_sweeps", max_sweeps), ("nudge_sweeps", nudge_sweeps),
                               ("tol", tol)) if v is not None}
    opts = CompileOptions(
        activation=parse_activation(activation), feedback=feedback, cost=cost,
        pool_first=pool_first, readout=readout,
        taps=taps,
        tap_weight=tap_weight, teacher=teacher, teacher_temperature=temperature,
        teacher_mix=mix, neuron=neuron, identity_skip=identity_skip, skip_gain=skip_gain,
        **{("schedule" if k == "mode" else k): v for k, v in sched.items()})
    out_path = output or _default_output(source, target)
    res = compile_source(source, opts, input_shape=_parse_shape(input_shape),
                         verify_model=verify, print_after=set(print_after or ()),
                         print_after_all=print_after_all, out=sys.stdout,
                         schedule_overrides=sched)
    g = res.graph
    if target == Target.neuromorphic:
        from epc.targets.neuromorphic.api import compile_program
        compile_program(g, out_path, weight_bits=weight_bits, frac_bits=frac_bits,
                        per_channel=per_channel, calibrate=calibrate, data_dir=data_dir,
                        resize=resize)
    elif target == Target.torch:
        from epc.targets.torch import emit
        emit(g, out_path, opts)
    else:
        from .bundle import Bundle, write_bundle
        write_bundle(out_path, Bundle(g, target=None, meta={"compiled_from": res.source.path}))
    if not quiet:
        msg = (f"epc: wrote {out_path}: {len(g.states)} states, {len(g.couplings)} couplings, "
               f"{g.num_parameters():,} parameters, "
               f"{len(g.schedule.classes) if g.schedule else 0} colours "
               f"({res.seconds:.2f} s)")
        if res.verify_error is not None:
            msg += f"; verify: max relative error {res.verify_error:.2e} (limit 1e-4) OK"
        _err(msg)
        skips = ([f"{c.src}->{c.dst}" for c in unit_gain_skips(g)]
                 if target == Target.torch else [])
        if skips:
            more = ", ..." if len(skips) > 3 else ""
            _err(f"epc: note: {len(skips)} identity skip(s) of gain 1 join states "
                 f"({', '.join(skips[:3])}{more}); with symmetric feedback, chained skips of "
                 f"gain 1 make the energy non-convex; EP training of the ResNet-13 example "
                 f"collapsed at gain 1 but learned with --skip-gain 0.5 (README: Deep nets)")


@app.command("inspect")
def inspect_cmd(
    path: str = typer.Argument(..., help="An epc bundle (.epc), an IR text file, or a "
                                         "neuromorphic program (.nc)."),
    fmt: Format = typer.Option(Format.text, "--format", "-f",
                               help="text: the IR (parses back exactly); json: for scripts; "
                                    "dot: Graphviz."),
    show_stats: bool = typer.Option(False, "--stats",
                                    help="States, couplings by kind, parameters, colours, "
                                         "MACs per sweep (with --format json: added as 'stats')."),
):
    """Print a compiled graph: the textual IR, JSON or Graphviz DOT.

    Examples:

      epc inspect r13.epc

      epc inspect r13.epc --format json | python -m json.tool

      epc inspect r13.epc --format dot > r13.dot && dot -Tpng r13.dot -o r13.png

      epc inspect r13.epc --stats
    """
    from .bundle import is_bundle, read_bundle
    from .inspect import stats, stats_table, to_dot, to_json
    from .text import HEADER, parse, print_graph

    if not os.path.exists(path):
        raise EpcError(f"{path}: no such file")
    if os.path.isdir(path):
        raise EpcError(f"{path}: is a directory")
    if _has_neuromorphic() and _nm_api().is_program(path):
        sys.stdout.write(_nm_api().inspect_program(path, fmt.value))
        return
    if is_bundle(path):
        g = read_bundle(path).graph
    else:
        with open(path, "rb") as f:
            head = f.read(64)
        if not head.lstrip().startswith(HEADER.encode()):
            raise EpcError(f"{path}: not an epc bundle, IR text or neuromorphic program "
                           f"(compile models with `epc compile`)")
        try:
            text = open(path, encoding="utf-8").read()
        except UnicodeDecodeError as e:
            raise EpcError(f"{path}: not UTF-8 text ({e})")
        g = parse(text, source=path)
    if fmt == Format.json:
        sys.stdout.write(json.dumps(to_json(g, with_stats=show_stats), indent=1) + "\n")
    elif fmt == Format.dot:
        sys.stdout.write(to_dot(g))
    elif show_stats:
        sys.stdout.write(stats_table(stats(g)))
    else:
        sys.stdout.write(print_graph(g))


def _has_neuromorphic() -> bool:
    return importlib.util.find_spec("epc.targets.neuromorphic.api") is not None


def _nm_api():
    return importlib.import_module("epc.targets.neuromorphic.api")


def _register_plugins() -> None:
    for mod in ("epc.runtime.cli", "epc.targets.neuromorphic.cli"):
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod).register(app)


_register_plugins()


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and turns every user error into one line, exit 2."""
    try:  # recent typer vendors its own click; older ones use click itself
        from typer._click.exceptions import ClickException, NoArgsIsHelpError
    except ImportError:
        from click.exceptions import ClickException
        NoArgsIsHelpError = ()
    try:
        app(args=argv, standalone_mode=False, prog_name="epc")
        return 0
    except EpcError as e:
        _err(f"epc: error: {e}")
        code = 2
    except typer.Exit as e:
        code = e.exit_code
    except NoArgsIsHelpError as e:  # `epc` or `epc compile` alone: show the help
        e.show()
        code = 2
    except ClickException as e:
        _err(f"epc: error: {e.format_message()} (see `epc --help`)")
        code = 2
    except typer.Abort:
        _err("epc: error: aborted")
        code = 130
    except KeyboardInterrupt:
        _err("epc: error: interrupted")
        code = 130
    except Exception as e:  # a bug in epc: still one line, traceback only on request
        if os.environ.get("EPC_DEBUG"):
            raise
        _err(f"epc: error: internal error ({type(e).__name__}: {e}); rerun with EPC_DEBUG=1 "
             f"for a traceback and please report it")
        code = 1
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
