"""The Python API: one function per `epc` command, taking that command's options.

    import epc
    g = epc.compile("examples/mlp_digits.onnx", verify=True)          # epc compile
    print(epc.inspect(g))                                               # epc inspect
    epc.compile("examples/mlp_digits.onnx", target="torch", output="mlp.epc")
    m = epc.train("mlp.epc", data="digits", epochs=30)                  # epc train
    epc.evaluate("ckpt/last.epc", data="digits")["accuracy"]            # epc eval
    epc.check_gradients("mlp.epc", data="digits", beta=0.01)            # epc check-gradients
    epc.compile("mlp.epc", target="neuromorphic", output="mlp.nc")
    epc.run("mlp.nc", data="digits")["test_accuracy"]                   # epc run

The CLI (epc/cli.py) parses its flags and calls these functions, so both take the same
options (`--max-sweeps` is `max_sweeps=`), with the same defaults, checks and error
messages; the CLI adds only what it prints (summary lines, progress bars, `--quiet`).
Two differences, both deliberate: `compile` writes a file only when given `output=` (the
CLI's default output is SOURCE's stem), and every function also takes Python objects
where the CLI takes files (an nn.Module with `example_input=`, a Graph, a pair of torch
Datasets with `dataset=`). Accuracies in the returned metrics, and in every metrics JSON,
are fractions in [0, 1], under keys ending in `accuracy`.

This module is the driver: it loads sources (epc/sources.py), runs the compiler, emits a
target, and hands training, evaluation and programs to the runtime. Nothing below it
imports it (pyproject.toml's import-linter contracts, tests/test_layering.py).
"""
from __future__ import annotations

import contextlib
import functools
import inspect as _inspect
import json as _json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from epc.compiler import flags
from epc.compiler.bundle import Bundle, read_bundle, write_bundle
from epc.compiler.errors import EpcError
from epc.compiler.ir import Activation, Graph
from epc.compiler.limits import scoped_memory_limit
from epc.compiler.options import CompileOptions

from .outputs import Output, check_outputs
from .sources import (UNTRAINED_TEACHER, Source, Verified, is_ir_text, load_source,
                      looks_untrained, read_ir_text, teacher_graph, torch_source,
                      verify_against_source)

TARGETS = ("ir", "torch", "neuromorphic")
INSPECT_FORMATS = ("text", "json", "dot")


# --------------------------------------------------------------------------- helpers
def _choice(flag: str, value: Any, allowed: Iterable[str]) -> str:
    value = getattr(value, "value", value)     # the CLI's enums carry their text
    if value not in allowed:
        raise EpcError(f"bad --{flag} {value!r}: use {' or '.join(allowed)}")
    return value


def parse_shape(spec: Any) -> tuple[int, ...] | None:
    """--input-shape: '1,3,32,32' (or 1x3x32x32), or a tuple of ints from Python."""
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            dims = tuple(int(d) for d in spec.replace("x", ",").split(","))
        except ValueError:
            raise EpcError(f"bad --input-shape {spec!r}: use comma-separated integers, "
                           f"e.g. 1,3,32,32")
    else:
        try:
            dims = tuple(int(d) for d in spec)
        except (TypeError, ValueError):
            raise EpcError(f"bad --input-shape {spec!r}: use comma-separated integers, "
                           f"e.g. 1,3,32,32")
    if not dims or any(d <= 0 for d in dims):
        raise EpcError(f"bad --input-shape {spec!r}: dimensions must be positive")
    return dims


def _path(p: Any) -> str | None:
    return None if p is None else os.fspath(p)


def _check_options(values: dict) -> None:
    """Every option that has a rule (compiler/flags.py: one per flag, whatever the
    command) is checked before any file is read."""
    for k, v in values.items():
        if k in flags.RULES:
            flags.check(k, v)
    if isinstance(values.get("data"), str) and values.get("dataset") is None:
        from epc.runtime.data import check_data_name, parse_resize
        check_data_name(values["data"])
        parse_resize(values.get("resize"))


def _data_inputs(data: Any, data_dir: Any) -> list[str]:
    """The data files a command would read (its outputs must not replace them)."""
    if not isinstance(data, str):
        return []
    from epc.runtime.data import data_files
    return data_files(data, data_dir)


@contextlib.contextmanager
def _naming(where: str):
    """A pass refusing the graph (e.g. `node pool1 (maxpool): ...`) names the file too."""
    try:
        yield
    except EpcError as e:
        if str(e).startswith(where):
            raise
        raise EpcError(f"{where}: {e}") from None


def _limited(fn: Callable) -> Callable:
    """Run the API function under its `memory_limit=` (compiler/limits.py), refusing a bad
    value before anything else; the signature stays the function's own."""
    sig = _inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        with scoped_memory_limit(bound.arguments.get("memory_limit")):
            return fn(*args, **kwargs)
    return run


def is_program(path: Any) -> bool:
    """A path to a neuromorphic program (binary or assembly text)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return False
    from epc.targets.neuromorphic.api import is_program as _is_program
    return _is_program(path)


def _defaults(fn: Callable) -> dict:
    return {k: p.default for k, p in _inspect.signature(fn).parameters.items()
            if p.default is not _inspect.Parameter.empty}


def _refuse_given(fn: Callable, values: dict, names: Iterable[str], why: Callable[[str], str]):
    """Refuse options set away from their defaults that do not apply: an option accepted
    and silently ignored would be a lie."""
    dflt = _defaults(fn)
    for name in names:
        if values[name] != dflt[name]:
            raise EpcError(why("--" + name.replace("_", "-")))


# --------------------------------------------------------------------------- compile
@dataclass
class CompileResult:
    graph: Graph
    source: Source
    seconds: float
    verify_error: float | None = None
    output: str | None = None        # the file written, if any
    target: str = "ir"
    warnings: list = None            # one line each (the CLI prints them as epc: warning:)
    verify: Verified | None = None   # what --verify measured (error, class agreement)

    def __post_init__(self):
        self.warnings = list(self.warnings or [])

    @property
    def substituted(self) -> str | None:
        """What --substitute changed in the network (None: nothing)."""
        return self.graph.attrs.get("substituted")


def compile_source(src: "str | Source", opts: CompileOptions | None = None, *,
                   input_shape: tuple[int, ...] | None = None, verify_model: bool = False,
                   print_after: set[str] | None = None, print_after_all: bool = False,
                   out=None, schedule_overrides: dict | None = None,
                   substitute: bool = False) -> CompileResult:
    """Load `src` and compile it with CompileOptions (what `compile` does before it emits a
    target). A feedforward source runs the pass pipeline; an already compiled graph (a
    bundle, e.g. a trained checkpoint) passes through unchanged except for
    `schedule_overrides` (mode, max_sweeps, nudge_sweeps, tol), which replace the fields of
    its schedule. `substitute`: the source model's smooth ops and gates are replaced by
    their nearest linear forms (`--substitute`)."""
    from epc.compiler.pipeline import (check_neuron_flags, compile_graph, pass_through,
                                       require_weights)
    opts = (opts or CompileOptions()).check()
    t0 = time.perf_counter()
    source = src if isinstance(src, Source) else load_source(src, input_shape=input_shape,
                                                             substitute=substitute)
    where = source.path
    opts.source_path = source.path
    g = source.graph
    if substitute and source.kind not in ("onnx", "torch"):
        raise EpcError(f"{where}: --substitute applies to source models (ONNX or PyTorch); "
                       f"this input is {'already compiled' if g.is_energy else 'IR text'}")
    if g.is_energy:
        g = pass_through(g, opts, where=where, schedule_overrides=schedule_overrides)
        check_neuron_flags(g, opts, schedule_overrides, where)
        if verify_model:
            raise EpcError(f"{where}: --verify compares with a source model (ONNX or "
                           f"PyTorch); this input is already compiled")
        return CompileResult(g, source, time.perf_counter() - t0)
    require_weights(g, where, "compile from a bundle or model")
    if verify_model and opts.skip_gain != 1.0:
        raise EpcError(f"{where}: --verify checks that the compiled graph computes the source "
                       f"model, and --skip-gain {opts.skip_gain:g} changes that function "
                       f"(its skips are scaled); verify without it")
    opts.teacher_graph = teacher_graph(opts, source)
    warned = []
    if opts.teacher == "source" and looks_untrained(opts.teacher_graph):
        warned.append(UNTRAINED_TEACHER.format(src=where))
    with _naming(where):
        energy = compile_graph(g, opts, print_after=print_after,
                               print_after_all=print_after_all, out=out)
    check_neuron_flags(energy, opts, schedule_overrides, where)
    res = CompileResult(energy, source, time.perf_counter() - t0, warnings=warned)
    if verify_model:
        res.verify = verify_against_source(source, energy)
        res.verify_error = res.verify.error
    return res


def default_output(source: str, target: str) -> str:
    """The CLI's output file when -o is not given: SOURCE's stem + .epc (.nc for
    neuromorphic programs), in the current directory."""
    stem = (Path(source.split(":")[0]).stem if ":" in source and not os.path.exists(source)
            else Path(source).stem)
    return stem + (".nc" if target == "neuromorphic" else ".epc")


@_limited
def compile_result(source: Any, *, output: str | None = None, target: str = "ir",
                   verify: bool = False, input_shape: Any = None,
                   activation: "str | Activation" = "clip:1.0", feedback: bool = True,
                   pool_first: bool | None = None, cost: str = "mse", readout: bool = False,
                   taps: "str | list[str] | None" = None, tap_weight: float = 0.3,
                   teacher: str | None = None, temperature: float = 4.0, mix: float = 0.5,
                   neuron: str = "rate", time_steps: int | None = None,
                   nudge_time_steps: int | None = None, averaging: str | None = None,
                   sampling: str | None = None, identity_skip: str = "identity",
                   skip_gain: float = 1.0, feedback_gain: "float | str" = "auto",
                   schedule: str | None = None,
                   max_sweeps: int | None = None, nudge_sweeps: int | None = None,
                   tol: float | None = None, print_after_all: bool = False,
                   print_after: "list[str] | None" = None, weight_bits: int = 8,
                   frac_bits: int = 8, per_channel: bool = False, calibrate: str | None = None,
                   data_dir: str | None = None, resize: int | None = None,
                   memory_limit: "str | int | None" = None,
                   example_input: Any = None, substitute: bool = False) -> CompileResult:
    """`epc compile`, returning what happened (the graph, the source, timing, the --verify
    error, the file written). `compile` is this, returning the graph. `substitute`: compile
    the nearest EP-compatible network (smooth activations -> their piecewise-linear
    forms, squeeze-excitation gates dropped); `result.substituted` says what changed and
    --verify then reports the deviation instead of failing."""
    target = _choice("target", target, TARGETS)
    _check_options(locals())
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int)
                               or not 1 <= resize <= 1 << 14):
        raise EpcError(f"bad --resize {resize!r}: must be an integer in [1, 16384]")
    output = _path(output)
    if target != "neuromorphic":
        _refuse_given(compile_result, locals(),
                      ("weight_bits", "frac_bits", "per_channel", "calibrate", "data_dir",
                       "resize"),
                      lambda flag: f"{flag} applies to --target neuromorphic")
    opts, sched = _compile_options(locals())
    opts.target = target   # 'auto' feedback gain resolves per target (symmetrize)
    if isinstance(source, (str, os.PathLike)):
        src: "str | Source" = os.fspath(source)
    elif isinstance(source, Graph):     # a graph in memory: compiled, or passed through
        src = Source(source.copy(), "graph", f"graph {source.name}")
    elif example_input is None:
        raise EpcError("compiling an nn.Module needs example_input=")
    else:
        src = torch_source(source, example_input, substitute=substitute)
    check_outputs([src if isinstance(src, str) else None, teacher,
                   _data_inputs(calibrate, data_dir) if calibrate else None],
                  [Output("-o", output)])
    res = compile_source(src, opts, input_shape=parse_shape(input_shape),
                         verify_model=verify, print_after=set(print_after or ()),
                         print_after_all=print_after_all, out=sys.stdout,
                         schedule_overrides=sched, substitute=substitute)
    res.target = target
    if output is not None:
        _emit(res, output, opts, weight_bits=weight_bits, frac_bits=frac_bits,
              per_channel=per_channel, calibrate=calibrate, data_dir=data_dir, resize=resize)
        res.output = output
    return res


def _compile_options(v: dict) -> tuple[CompileOptions, dict]:
    """The CompileOptions of compile's arguments `v` (checked: bad values are refused
    before any file is read), and the schedule fields given explicitly (which also
    override an already compiled input's)."""
    schedule = v["schedule"]
    sched = {k: x for k, x in (("mode", "colour" if schedule == "color" else schedule),
                               ("max_sweeps", v["max_sweeps"]),
                               ("nudge_sweeps", v["nudge_sweeps"]), ("tol", v["tol"]))
             if x is not None}
    opts = CompileOptions(
        activation=v["activation"], feedback=v["feedback"], cost=v["cost"],
        pool_first=v["pool_first"], readout=v["readout"], taps=v["taps"],
        tap_weight=v["tap_weight"], teacher=v["teacher"], teacher_temperature=v["temperature"],
        teacher_mix=v["mix"], neuron=v["neuron"], time_steps=v.get("time_steps"),
        nudge_time_steps=v.get("nudge_time_steps"), averaging=v.get("averaging"),
        sampling=v.get("sampling"), identity_skip=v["identity_skip"],
        skip_gain=v["skip_gain"], feedback_gain=v["feedback_gain"],
        **{("schedule" if k == "mode" else k): x for k, x in sched.items()})
    return opts.check(), sched


def _emit(res: CompileResult, output: str, opts: CompileOptions, *, weight_bits, frac_bits,
          per_channel, calibrate, data_dir, resize) -> None:
    g = res.graph
    if res.target == "neuromorphic":
        from epc.targets.neuromorphic.api import compile_program
        compile_program(g, output, weight_bits=weight_bits, frac_bits=frac_bits,
                        per_channel=per_channel,
                        calibration=_calibration(calibrate, data_dir, resize) if calibrate
                        else None, calibrated_on=calibrate)
    elif res.target == "torch":
        from epc.targets.torch import emit
        emit(g, output, opts)
    else:
        write_bundle(output, Bundle(g, target=None, meta={"compiled_from": res.source.path}))


def _calibration(data: str, data_dir, resize) -> Callable[[Graph], dict]:
    """--calibrate DATA: real activations, the float runtime's free equilibria on a sample
    of DATA (the target asks for them once it knows the graph quantizes)."""
    def acts(graph: Graph) -> dict:
        from epc.runtime.programs import calibration_acts
        return calibration_acts(graph, data, data_dir=data_dir, resize=resize)
    return acts


def compile(source: Any, **options: Any) -> Graph:
    """Compile an ONNX file, an epc bundle, a `module:factory` spec (with input_shape=), an
    nn.Module (with example_input=) or a Graph into an EP energy graph; with `output=`, also write
    it for `target` ('ir', 'torch' or 'neuromorphic'). Takes `epc compile`'s options;
    returns the energy graph."""
    unknown = sorted(set(options) - set(_inspect.signature(compile_result).parameters))
    if unknown:
        raise TypeError(f"compile() got an unexpected keyword argument {unknown[0]!r}")
    return compile_result(source, **options).graph


compile.__signature__ = _inspect.signature(compile_result).replace(return_annotation=Graph)


# --------------------------------------------------------------------------- check
# compile's options that write or compare something, which a check does not do
_NOT_CHECKED = ("output", "verify", "print_after_all", "print_after", "calibrate", "data_dir",
                "resize")


def check(source: Any, **options: Any) -> dict:
    """`epc compile --check`: the compatibility report of a source model, nothing written.
    Takes compile's options (the target and the compiler options matter: the report
    runs the frontend on every op, then, when nothing was refused, the compiler passes,
    and for --target neuromorphic the quantizer and the program validator). Returns a
    JSON-able dict: 'compatible', 'source', 'frontend', 'ops' (source op -> count
    translated), 'unsupported' (per source op: count, first node, reason, whether
    --substitute replaces it), 'substituted' (what --substitute changed), 'compiled'
    (states, couplings, parameters) or 'error' (the first refusal past the frontend),
    'supported' (the frontend's list)."""
    params = _inspect.signature(compile_result).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise TypeError(f"check() got an unexpected keyword argument {unknown[0]!r}")
    v = {k: p.default for k, p in params.items() if k != "source"}
    v.update(options)
    for name in _NOT_CHECKED:
        if v[name] != params[name].default:
            raise EpcError(f"--{name.replace('_', '-')} does not apply to --check (it writes "
                           f"and compares nothing)")
    target = _choice("target", v["target"], TARGETS)
    _check_options(v)        # every option by its rule (compiler/flags.py), before any file
    if target != "neuromorphic":
        _refuse_given(compile_result, v, ("weight_bits", "frac_bits", "per_channel"),
                      lambda flag: f"{flag} applies to --target neuromorphic")
    with scoped_memory_limit(v["memory_limit"]):
        return _check(source, v, target)


def _check(source: Any, v: dict, target: str) -> dict:
    opts, _ = _compile_options(v)
    from .sources import survey_source
    if isinstance(source, (str, os.PathLike)):
        src: Any = os.fspath(source)
    elif v["example_input"] is None:
        raise EpcError("checking an nn.Module needs example_input=")
    else:
        src = source
    r = survey_source(src, input_shape=parse_shape(v["input_shape"]),
                      example_input=v["example_input"], substitute=v["substitute"])
    from epc.frontends.common import Unsupported, group_refusals
    rep: dict = {"source": r["source"], "frontend": r["frontend"], "target": target,
                 "ops": dict(sorted(r["ops"].items(), key=lambda kv: -kv[1])),
                 "unsupported": [
                     {"op": op, "count": len(rs), "first": rs[0].node, "reason": rs[0].reason,
                      "substitutable": all(x.substitutable for x in rs)}
                     for op, rs in group_refusals(r["refusals"]).items()],
                 "substituted": None, "compiled": None, "error": None,
                 "supported": r["supported"]}
    if r["refusals"]:
        rep["error"] = str(Unsupported(r["source"], r["refusals"], r["supported"]))
    else:
        rep["substituted"] = r["graph"].attrs.get("substituted")
        rep.update(_check_compiles(r, opts, target, v))
    rep["compatible"] = rep["error"] is None
    return rep


def _check_compiles(r: dict, opts: CompileOptions, target: str, v: dict) -> dict:
    """The compiler passes (and the core's quantizer and validator) on a surveyed graph."""
    from epc.compiler.pipeline import compile_graph
    g = r["graph"]
    try:
        opts.source_path = r["source"]
        if opts.teacher is not None:
            opts.teacher_graph = teacher_graph(opts, Source(g, r["kind"], r["source"]))
        energy = compile_graph(g, opts)
    except EpcError as e:
        return {"error": f"compiling: {e}"}
    out = {"compiled": {"states": len(energy.states), "couplings": len(energy.couplings),
                        "parameters": energy.num_parameters()}}
    if target == "neuromorphic":
        from epc.targets.neuromorphic.api import check_program
        try:
            check_program(energy, weight_bits=v["weight_bits"], frac_bits=v["frac_bits"],
                          per_channel=v["per_channel"])
        except EpcError as e:
            out["error"] = f"neuromorphic target: {e}"
    return out


# --------------------------------------------------------------------------- opt
OPT_WEIGHTS = ("shapes", "seeded", "inline")


@_limited
def opt(source: Any, *, passes: "list[str] | None" = None, output: str | None = None,
        weights: str = "seeded", input_shape: Any = None,
        activation: "str | Activation" = "clip:1.0", feedback: bool = True,
        pool_first: bool | None = None, cost: str = "mse", readout: bool = False,
        taps: "str | list[str] | None" = None, tap_weight: float = 0.3,
        teacher: str | None = None, temperature: float = 4.0, mix: float = 0.5,
        neuron: str = "rate", time_steps: int | None = None,
        nudge_time_steps: int | None = None, averaging: str | None = None,
        sampling: str | None = None, identity_skip: str = "identity", skip_gain: float = 1.0,
        feedback_gain: "float | str" = "auto",
        schedule: str | None = None, max_sweeps: int | None = None,
        nudge_sweeps: int | None = None, tol: float | None = None,
        print_after_all: bool = False, memory_limit: "str | int | None" = None) -> str:
    """`epc opt`: run the named compiler passes, in the order given, on a graph (IR text,
    an epc bundle, an ONNX file, a `module:factory` spec with input_shape=, or a Graph) and
    return the result as IR text; `passes` None runs the whole pipeline, as `compile`
    does. The options are `compile`'s, and a pass the options leave off is refused (e.g.
    --pass pool_first needs --pool-first). `weights` is how the text writes weights:
    'shapes' (declarations only), 'seeded' (also `= seeded(N)` recipes while the data is
    still what they make) or 'inline' (every value). With `output=`, also writes the text
    there (atomically)."""
    from epc.compiler.bundle import atomic_write_bytes
    from epc.compiler.passes import run_passes
    from epc.compiler.text import print_graph
    weights = _choice("weights", weights, OPT_WEIGHTS)
    _check_options(locals())
    sched = {k: v for k, v in (("schedule", "colour" if schedule == "color" else schedule),
                               ("max_sweeps", max_sweeps), ("nudge_sweeps", nudge_sweeps),
                               ("tol", tol)) if v is not None}
    opts = CompileOptions(
        activation=activation, feedback=feedback, cost=cost, pool_first=pool_first,
        readout=readout, taps=taps, tap_weight=tap_weight, teacher=teacher,
        teacher_temperature=temperature, teacher_mix=mix, neuron=neuron,
        time_steps=time_steps, nudge_time_steps=nudge_time_steps, averaging=averaging,
        sampling=sampling, identity_skip=identity_skip, skip_gain=skip_gain,
        feedback_gain=feedback_gain,
        **sched).check()
    output = _path(output)
    check_outputs([None if isinstance(source, Graph) else source, teacher],
                  [Output("-o", output)])
    if isinstance(source, Graph):
        src = Source(source.copy(), "graph", f"graph {source.name}")
    else:
        src = load_source(os.fspath(source), input_shape=parse_shape(input_shape))
    opts.source_path = src.path
    if teacher is not None and teacher != "source":
        opts.teacher_graph = teacher_graph(opts, src)
    with _naming(src.path):
        g = run_passes(src.graph, passes, opts, source_name=src.path,
                       print_after_all=print_after_all, out=sys.stdout, weights=weights)
    text = print_graph(g, weights=weights)
    if output is not None:
        atomic_write_bytes(output, text.encode())
    return text


# --------------------------------------------------------------------------- inspect
@_limited
def inspect(source: Any, *, format: str = "text", stats: bool = False,
            memory_limit: "str | int | None" = None) -> str:
    """`epc inspect`: a graph (or a bundle, IR text or neuromorphic program file) as the
    textual IR ('text'), JSON ('json') or Graphviz DOT ('dot'); `stats`: the statistics
    (a table with 'text', a 'stats' entry with 'json'). Returns the text the command
    prints."""
    from epc.compiler.inspect import stats as graph_stats, stats_table, to_dot, to_json
    from epc.compiler.text import print_graph
    fmt = _choice("format", format, INSPECT_FORMATS)
    if isinstance(source, Graph):
        g = source
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise EpcError(f"{path}: no such file")
        if os.path.isdir(path):
            raise EpcError(f"{path}: is a directory")
        if is_program(path):
            from epc.runtime.programs import inspect_program
            return inspect_program(path, fmt)
        from epc.compiler.bundle import is_bundle
        if is_bundle(path):
            g = read_bundle(path).graph
        elif is_ir_text(path):
            g = read_ir_text(path)
        else:
            raise EpcError(f"{path}: not an epc bundle, IR text or neuromorphic program "
                           f"(compile models with `epc compile`)")
    if fmt == "json":
        return _json.dumps(to_json(g, with_stats=stats), indent=1) + "\n"
    if fmt == "dot":
        return to_dot(g)
    return stats_table(graph_stats(g)) if stats else print_graph(g)


def load(path: Any) -> Graph:
    """Read a bundle's graph (weights attached)."""
    return read_bundle(os.fspath(path)).graph


def save(graph: Graph, path: Any, *, target: str | None = None) -> None:
    """Write a graph as a bundle (atomically)."""
    write_bundle(os.fspath(path), Bundle(graph, target=target))


# --------------------------------------------------------------------------- train
# what on-chip learning takes: every other option of `train` is the float runtime's
PROGRAM_TRAIN_OPTIONS = ("data", "data_dir", "resize", "epochs", "batch_size", "beta",
                         "lr_shift", "output", "seed", "threads", "metrics_json", "on_epoch",
                         "divergence", "memory_limit")


def _program_only_error(model: str) -> Callable[[str], str]:
    return lambda flag: (f"{model}: {flag} applies to float bundles, not to neuromorphic "
                         f"programs")


def _float_only_error(model: str) -> Callable[[str], str]:
    return lambda flag: (f"{model}: {flag} applies to neuromorphic programs; a float bundle "
                         f"keeps its trained weights with --checkpoint DIR")


@_limited
def train(model: Any, *, data: str = "digits", data_dir: str | None = None,
          resize: str | None = None, channels: int | None = None, epochs: int = 30,
          batch_size: int = 32, optimizer: str = "adam", lr: float | None = None,
          momentum: float = 0.9, weight_decay: float = 1e-3, decoupled_wd: bool = True,
          cosine: bool = True,
          clip: float | None = None, beta: float | None = None, lr_shift: int | None = None,
          output: str | None = None, nudge: str = "symmetric", nudge_form: str = "states",
          gradient: str = "ep", estimate: str = "rates", layer_lrs: "str | tuple" = "auto",
          seed: int = 0,
          schedule: str | None = None, max_sweeps: int | None = None,
          nudge_sweeps: int | None = None, tol: float | None = None,
          warm_start: bool = False, freeze_pool: bool = True, augment: str | None = None,
          device: str = "cpu", threads: int = 1, checkpoint: str | None = None,
          resume: bool = False, stop_after: int | None = None,
          metrics_json: str | None = None, plot: str | None = None,
          divergence: str = "stop", memory_limit: "str | int | None" = None,
          dist_timeout: float = 300.0, precision: str = "fp32", dataset: Any = None,
          backprop_epochs: "int | str" = "auto", backprop_lr: float = 2e-3,
          progress: Callable | None = None, on_epoch: Callable | None = None) -> dict:
    """`epc train`: train a compiled network with Equilibrium Propagation, or a
    neuromorphic program by on-chip learning in the simulator. Returns the metrics.

    `backprop_epochs` (float bundles): N epochs of backprop on the graph's feedforward form
    (Adam at `backprop_lr`, cosine; the graph's label cost, the same data and seed) before
    the EP epochs: a warm start. 'auto' (the default) picks 30 on graphs where cold EP is
    measured to fail (skip couplings between states, or more than 4 convolutional hidden
    states, under regulated feedback) and 0 elsewhere (runtime/warm.py). The metrics then
    hold `warm_start` (the backprop epochs' history), `initial` (the free phase before
    anything) and `converted` (after the backprop epochs, before any EP step);
    `on_epoch` gets each backprop epoch's record with `phase: 'backprop'`.
    `lr` None: 5e-4, or 1e-4 (5e-4 x 0.2) after a warm start.

    `model`: a bundle path (target torch or plain IR), a Bundle or an energy Graph; or a
    program file (.nc/.nca), which takes only data, data_dir, resize, epochs, batch_size,
    beta (default: the program's), lr_shift, output (the trained program), seed, threads,
    metrics_json and on_epoch (no per-batch progress). For float bundles beta defaults
    to 0.2.
    `dataset=(train, test)`: torch Datasets of (input, label) instead of `data`.
    `progress(epoch, seen, total, loss, accuracy)`: after every batch (float bundles);
    `on_epoch(record)`: after every epoch.
    `divergence`: what the divergence watch does after an epoch whose loss is NaN/Inf or
    over 10x its first batch's, or whose test accuracy fell back to chance after a healthy
    start: 'stop' (raise; the checkpoint keeps the epoch before) or 'warn' (the epoch
    record's `divergence_warning`).
    `memory_limit`: what settling, resized data and the model's declared sizes may take
    (compiler/limits.py; default 1G or $EPC_MEMORY_LIMIT).
    Data parallel (float bundles): under `torchrun --nproc-per-node N -m epc train ...`, or
    called inside an initialised torch.distributed process group, the processes split each
    global batch of `batch_size` and end at the weights one process reaches (see
    runtime/distributed.py); `dist_timeout` (seconds) bounds every collective when epc
    forms the group itself (under torchrun).
    `precision` ('fp32', 'bf16', 'fp16', float bundles): the settle loop in 16 bits, float32
    master weights, stop test and EP difference; refused where the device lacks the dtype.
    `estimate` (bernoulli networks): the EP update from the nudged phases' rate estimates
    ('rates') or from their spike trains ('spikes').
    `layer_lrs`: the learning rate of each depth level of the graph, as factors on `lr`:
    'none' (one rate), 'auto' (factors derived from the graph) or a sequence (or
    comma-separated text) of one factor per level, input side first.
    """
    given = dict(locals())
    _check_options({k: v for k, v in given.items() if not (k == "lr" and v is None)})
    check_outputs([model, _data_inputs(data, data_dir)],
                  [Output("-o", _path(output)), Output("--metrics-json", _path(metrics_json)),
                   Output("--plot", _path(plot)),
                   Output("--checkpoint", _path(checkpoint), directory=True)],
                  rewrites=[os.path.join(checkpoint, "last.epc")] if checkpoint and resume
                  else [])
    if is_program(model):
        model = os.fspath(model)
        _one_process(f"{model}: on-chip learning")
        if augment is not None:
            raise EpcError(f"{model}: --augment applies to float bundles; on-chip learning "
                           f"reads the data set as it is")
        if gradient != "ep":
            raise EpcError(f"{model}: --gradient {gradient} applies to float bundles; "
                           f"on-chip learning is EP")
        if estimate != "rates":
            raise EpcError(f"{model}: --estimate {estimate} applies to float bundles with "
                           f"bernoulli neurons; on-chip learning reads the nudged phases' "
                           f"integer rates")
        if flags.check("backprop_epochs", backprop_epochs) == 0:
            given["backprop_epochs"] = "auto"     # no warm start: what a program gets
        _refuse_given(train, given, [k for k in _defaults(train)
                                     if k not in PROGRAM_TRAIN_OPTIONS],
                      _program_only_error(model))
        from epc.runtime.api import configure_process
        from epc.runtime.programs import train_program
        configure_process(threads)
        return train_program(model, data=data, epochs=epochs, seed=seed,
                             metrics_json=_path(metrics_json), data_dir=data_dir,
                             resize=resize, lr_shift=lr_shift, beta=beta, out=_path(output),
                             batch_size=batch_size, divergence=divergence, on_epoch=on_epoch)
    _refuse_given(train, given, ("output", "lr_shift"), _float_only_error(str(model)))
    from epc.runtime.api import train as train_float
    return train_float(_bundle_arg(model), data=data, data_dir=data_dir, resize=resize,
                       channels=channels, dataset=dataset, epochs=epochs,
                       batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum,
                       weight_decay=weight_decay, decoupled_wd=decoupled_wd, cosine=cosine,
                       clip=clip, beta=0.2 if beta is None else beta, nudge=nudge,
                       nudge_form=nudge_form, gradient=gradient, estimate=estimate,
                       layer_lrs=layer_lrs, seed=seed, schedule=schedule, max_sweeps=max_sweeps,
                       nudge_sweeps=nudge_sweeps, tol=tol, warm_start=warm_start,
                       freeze_pool=freeze_pool, augment=augment, device=device,
                       threads=threads, checkpoint=_path(checkpoint), resume=resume,
                       stop_after=stop_after, metrics_json=_path(metrics_json),
                       plot=_path(plot), divergence=divergence, dist_timeout=dist_timeout,
                       precision=precision, backprop_epochs=backprop_epochs,
                       backprop_lr=backprop_lr, progress=progress, on_epoch=on_epoch)


def _one_process(what: str) -> None:
    """Refuse a command that runs in one process when torchrun started several."""
    from epc.runtime.distributed import launched_processes
    if launched_processes() > 1:
        raise EpcError(f"{what} runs in one process, and torchrun started "
                       f"{launched_processes()}: run it without torchrun (data-parallel "
                       f"runs are `epc train` and `epc eval` of float bundles)")


def _bundle_arg(model: Any) -> Any:
    return os.fspath(model) if isinstance(model, os.PathLike) else model


# --------------------------------------------------------------------------- backprop
@_limited
def backprop(model: Any, *, data: str = "digits", data_dir: str | None = None,
             resize: str | None = None, channels: int | None = None, epochs: int = 20,
             batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 0.0,
             activations: str = "energy", loss: str = "graph", seed: int = 0,
             output: str | None = None, onnx: str | None = None, device: str = "cpu",
             threads: int = 1,
             metrics_json: str | None = None, memory_limit: "str | int | None" = None,
             dataset: Any = None, progress: Callable | None = None,
             on_epoch: Callable | None = None) -> dict:
    """`epc backprop`: train the feedforward form of a compiled network (the source
    architecture: every state once, in order, no feedback) by backprop from the bundle's
    weights; write the trained weights as a bundle (`output`: what `epc train` fine-tunes
    by EP, a warm conversion) and/or the trained feedforward net as ONNX (`onnx`: a teacher
    for `epc compile --teacher`). `activations`: 'energy' (the compiled graph's bounded
    ones, e.g. clip(0, 1): the function EP's free phase computes) or 'source' (the source
    model's, e.g. ReLU). `loss`: 'graph' (the compiled graph's label cost, mse or ce: the
    objective EP fine-tuning goes on with), 'ce' or 'mse'. Returns the metrics: test accuracy before (`initial`) and after,
    `history`, and `converted` (the EP free phase with the trained weights, before any EP
    step). `progress(epoch, seen, total, loss, accuracy)` after every batch,
    `on_epoch(record)` after every epoch."""
    _check_options(locals())
    _refuse_program(model, "backprop")
    _one_process("epc backprop")
    check_outputs([model, _data_inputs(data, data_dir)],
                  [Output("-o", _path(output)), Output("--onnx", _path(onnx)),
                   Output("--metrics-json", _path(metrics_json))])
    from epc.runtime.api import backprop as backprop_float
    return backprop_float(_bundle_arg(model), data=data, data_dir=data_dir, resize=resize,
                          channels=channels, dataset=dataset, epochs=epochs,
                          batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                          activations=activations, loss=loss, seed=seed, device=device,
                          threads=threads, output=_path(output), onnx=_path(onnx),
                          metrics_json=_path(metrics_json), progress=progress,
                          on_epoch=on_epoch)


# --------------------------------------------------------------------------- eval
# what evaluating a program takes (its test split, in the simulator)
PROGRAM_EVAL_OPTIONS = ("data", "data_dir", "resize", "batch_size", "threads", "metrics_json",
                        "memory_limit")


@_limited
def evaluate(model: Any, *, data: str = "digits", data_dir: str | None = None,
             resize: str | None = None, channels: int | None = None, split: str = "test",
             batch_size: int = 256, schedule: str | None = None,
             max_sweeps: int | None = None, tol: float | None = None,
             precision: str | None = None, device: str = "cpu",
             threads: int = 1, metrics_json: str | None = None,
             memory_limit: "str | int | None" = None, dataset: Any = None) -> dict:
    """`epc eval`: free-phase accuracy, loss and convergence of a (trained) bundle on a
    split; a checkpoint of `train` settles as its training run did unless schedule,
    max_sweeps, tol or precision say otherwise. A neuromorphic program is run in the simulator on
    the test split (data, data_dir, resize, batch_size, threads, metrics_json apply).
    Returns the result ('accuracy' a fraction)."""
    given = dict(locals())
    _check_options(given)
    check_outputs([model, _data_inputs(data, data_dir)],
                  [Output("--metrics-json", _path(metrics_json))])
    if is_program(model):
        model = os.fspath(model)
        _one_process(f"{model}: the integer simulator")
        _refuse_given(evaluate, given, [k for k in _defaults(evaluate)
                                        if k not in PROGRAM_EVAL_OPTIONS],
                      _program_only_error(model))
        from epc.runtime.api import configure_process
        from epc.runtime.programs import run_program
        configure_process(threads)
        r = run_program(model, data=data, data_dir=data_dir, resize=resize,
                        batch_size=batch_size)
        r.update({"accuracy": r["test_accuracy"], "split": "test"})
        if metrics_json:
            _write_json(metrics_json, r)
        return r
    from epc.runtime.api import evaluate as evaluate_float
    return evaluate_float(_bundle_arg(model), data=data, data_dir=data_dir, resize=resize,
                          channels=channels, dataset=dataset, split=split,
                          batch_size=batch_size, schedule=schedule, max_sweeps=max_sweeps,
                          tol=tol, precision=precision, device=device, threads=threads,
                          json_path=_path(metrics_json))


def _write_json(path: Any, obj: dict) -> None:
    from epc.compiler.bundle import atomic_write_bytes
    atomic_write_bytes(os.fspath(path),
                       (_json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def _refuse_program(model: Any, command: str) -> None:
    if is_program(model):
        raise EpcError(f"{os.fspath(model)}: a neuromorphic program, not a float bundle; "
                       f"`epc {command}` reads the .epc bundle it was compiled from")


# --------------------------------------------------------------------------- check-gradients
@_limited
def check_gradients(model: Any, *, data: str = "digits", data_dir: str | None = None,
                    resize: str | None = None, channels: int | None = None,
                    beta: float = 0.01, nudge: str = "symmetric", samples: int = 64,
                    seed: int = 0, tol: float = 1e-7, max_sweeps: int = 5000,
                    dtype: str = "float64", schedule: str | None = None,
                    freeze_pool: bool = True, seeds: int = 16, estimate: str = "rates",
                    device: str = "cpu", threads: int = 1,
                    metrics_json: str | None = None, memory_limit: "str | int | None" = None,
                    dataset: Any = None) -> dict:
    """`epc check-gradients`: the EP estimate against the true gradient (implicit
    differentiation at the free fixed point), coupling by coupling: cosine, norm ratio,
    sign agreement. Returns the table as a dict (with 'warnings' where phases did not
    settle). A network with bernoulli neurons: the mean of `seeds` stochastic estimates
    (from the rate estimates or, `estimate='spikes'`, the spike trains) against the
    gradient of its mean-field (rate) twin, with the spread of the single estimates."""
    _check_options(locals())
    _refuse_program(model, "check-gradients")
    _one_process("epc check-gradients")
    check_outputs([model, _data_inputs(data, data_dir)],
                  [Output("--metrics-json", _path(metrics_json))])
    from epc.runtime.api import check_gradients as check_float
    return check_float(_bundle_arg(model), data=data, data_dir=data_dir, resize=resize,
                       channels=channels, dataset=dataset, beta=beta, nudge=nudge,
                       samples=samples, seed=seed, tol=tol, max_sweeps=max_sweeps,
                       dtype=dtype, schedule=schedule, freeze_pool=freeze_pool,
                       seeds=seeds, estimate=estimate, device=device, threads=threads,
                       json_path=_path(metrics_json))


# --------------------------------------------------------------------------- run
@_limited
def run(program: Any, *, data: str = "digits", data_dir: str | None = None,
        resize: str | None = None, limit: int | None = None, batch_size: int = 256,
        metrics_json: str | None = None, memory_limit: "str | int | None" = None) -> dict:
    """`epc run`: inference of a neuromorphic program in the bit-exact integer simulator on
    the test split. Returns the metrics ('test_accuracy' a fraction, sweeps, unsettled and
    cycling samples, overflows, resources)."""
    from epc.runtime.programs import run_program
    _check_options(locals())
    _one_process("epc run")
    check_outputs([program, _data_inputs(data, data_dir)],
                  [Output("--metrics-json", _path(metrics_json))])
    return run_program(os.fspath(program), data=data, data_dir=data_dir, resize=resize,
                       limit=limit, batch_size=batch_size, metrics_json=_path(metrics_json))
