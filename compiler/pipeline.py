"""The compile driver: load a source, run the passes, check against the source model.

This is the only compiler module that imports frontends: it is the driver that connects
them to the passes (the passes themselves never load files). The CLI and the Python API
(`epc.compile`) are thin layers over `compile_source`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from .bundle import is_bundle, read_bundle
from .errors import EpcError
from .ir import Graph, Softmax
from .options import CompileOptions
from .passes.manager import PassManager
from .text import looks_like_ir, parse

VERIFY_RTOL = 1e-4


@dataclass
class Source:
    """What was loaded: the graph and how to run the original model (for --verify)."""

    graph: Graph
    kind: str                      # 'onnx' | 'torch' | 'bundle' | 'text'
    path: str
    module: object = None          # the torch module, for kind 'torch'
    meta: dict = field(default_factory=dict)


def _looks_like_torch_spec(src: str) -> bool:
    # pkg.module:factory or path/to/file.py:factory; a Windows drive letter is not a spec
    if os.path.exists(src) or ":" not in src:
        return False
    mod, _, attr = src.rpartition(":")
    return bool(mod) and attr.isidentifier()


def load_source(src: str, *, input_shape: tuple[int, ...] | None = None) -> Source:
    """Load an ONNX file, an epc bundle, an IR text file or a `module:factory` spec."""
    if _looks_like_torch_spec(src):
        if not input_shape:
            raise EpcError(f"{src}: a PyTorch module spec needs --input-shape, "
                           f"e.g. --input-shape 1,3,32,32")
        from epc.frontends.torch import build_module_from_spec
        module, example = build_module_from_spec(src, input_shape)
        return torch_source(module, example, name=src)
    if not os.path.exists(src):
        raise EpcError(f"{src}: no such file")
    if os.path.isdir(src):
        raise EpcError(f"{src}: is a directory, expected an ONNX file, an epc bundle or IR text")
    if is_bundle(src):
        b = read_bundle(src)
        return Source(b.graph, "bundle", src, meta={"target": b.target, **b.meta})
    with open(src, "rb") as f:
        head = f.read(4096)         # IR text may open with comment lines
    if looks_like_ir(head):
        try:
            text = open(src, encoding="utf-8").read()
        except UnicodeDecodeError as e:
            raise EpcError(f"{src}: not UTF-8 text ({e})")
        return Source(parse(text, source=src), "text", src)
    from epc.frontends.onnx import load_onnx
    return Source(load_onnx(src), "onnx", src)


def torch_source(module, example_input, *, name: str | None = None) -> Source:
    """A Source for an in-memory nn.Module (the Python API's path)."""
    from epc.frontends.torch import load_torch
    label = name or type(module).__name__
    return Source(load_torch(module, example_input, source=label), "torch", label,
                  module=module)


def _teacher_graph(opts: CompileOptions, source: Source) -> Graph | None:
    if opts.teacher is None:
        return None
    if opts.teacher == "source":
        if source.graph.is_energy:
            raise EpcError(f"{source.path}: --teacher source needs a feedforward source "
                           f"(ONNX or PyTorch), this is an already compiled graph")
        return source.graph.copy()
    t = load_source(opts.teacher)
    if t.graph.is_energy:
        raise EpcError(f"{opts.teacher}: a teacher must be a feedforward model (ONNX file), "
                       f"not a compiled graph")
    return t.graph


def _need_weight_data(g: Graph, src: str) -> None:
    """Compiling needs every weight's data: a text IR that only declares one is refused."""
    missing = [n for n, w in g.weights.items() if not isinstance(w, np.ndarray)]
    if missing:
        raise EpcError(f"{src}: weight {missing[0]} has no data in the IR text; give it as "
                       f"`= seeded(N)` or a literal tensor, or compile from the bundle (.epc) "
                       f"or the source model")


def compile_graph(ff: Graph, opts: CompileOptions, *, print_after: set[str] | None = None,
                  print_after_all: bool = False, out: TextIO | None = None) -> Graph:
    """Run the default pass pipeline on a feedforward graph; returns the energy graph."""
    from .passes import build_pipeline
    from .verify import verify
    verify(ff)
    pm = PassManager(build_pipeline(opts), print_after=print_after,
                     print_after_all=print_after_all, out=out)
    return pm.run(ff, opts)


@dataclass
class CompileResult:
    graph: Graph
    source: Source
    seconds: float
    verify_error: float | None = None


# Options that change the network (its structure or its initial weights): refused for
# already compiled inputs when given (set, and not to their default).
STRUCTURAL = ("taps", "teacher", "pool_first", "readout", "skip_gain")


def compile_source(src: "str | Source", opts: CompileOptions | None = None, *,
                   input_shape: tuple[int, ...] | None = None, verify_model: bool = False,
                   print_after: set[str] | None = None, print_after_all: bool = False,
                   out: TextIO | None = None,
                   schedule_overrides: dict | None = None) -> CompileResult:
    """Load `src` and compile it. A feedforward source runs the pass pipeline; an already
    compiled graph (a bundle, e.g. a trained checkpoint) passes through unchanged except
    for `schedule_overrides` (mode, max_sweeps, nudge_sweeps, tol), which replace the
    fields of its schedule."""
    opts = (opts or CompileOptions()).check()
    t0 = time.perf_counter()
    source = src if isinstance(src, Source) else load_source(src, input_shape=input_shape)
    src = source.path
    opts.source_path = source.path
    g = source.graph
    if g.is_energy:
        # An already compiled (maybe trained) graph: it passes through unchanged.
        default = CompileOptions()
        given = [k for k in STRUCTURAL
                 if getattr(opts, k) and getattr(opts, k) != getattr(default, k)]
        if given:
            flag = given[0].replace("_", "-")
            raise EpcError(f"{src}: already compiled; --{flag} applies to feedforward "
                           f"sources (ONNX or PyTorch)")
        _need_weight_data(g, src)
        from .verify import verify
        if schedule_overrides and g.schedule is not None:
            g.schedule = dataclasses.replace(g.schedule, **schedule_overrides)
        verify(g)
        if verify_model:
            raise EpcError(f"{src}: --verify compares with a source model (ONNX or PyTorch); "
                           f"this input is already compiled")
        return CompileResult(g, source, time.perf_counter() - t0)
    _need_weight_data(g, src)
    if verify_model and opts.skip_gain != 1.0:
        raise EpcError(f"{src}: --verify checks that the compiled graph computes the source "
                       f"model, and --skip-gain {opts.skip_gain:g} changes that function "
                       f"(its skips are scaled); verify without it")
    opts.teacher_graph = _teacher_graph(opts, source)
    energy = compile_graph(g, opts, print_after=print_after, print_after_all=print_after_all,
                           out=out)
    res = CompileResult(energy, source, time.perf_counter() - t0)
    if verify_model:
        res.verify_error = verify_against_source(source, energy)
    return res


# --------------------------------------------------------------------------- --verify
def _source_outputs(source: Source, x: np.ndarray) -> np.ndarray:
    if source.kind == "onnx":
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(source.path, so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = x.astype(np.float32)
        fixed = inp.shape[0] if inp.shape else None
        if not (isinstance(fixed, int) and fixed > 0) or fixed == len(x):
            return sess.run(None, {inp.name: x})[0].astype(np.float64)
        # a model exported with a fixed batch size (often 1): run it that many at a time,
        # the last chunk filled up with repeated rows
        outs = []
        for i in range(0, len(x), fixed):
            chunk = x[i:i + fixed]
            pad = np.concatenate([chunk, np.repeat(chunk[:1], fixed - len(chunk), 0)])
            outs.append(sess.run(None, {inp.name: pad})[0][:len(chunk)])
        return np.concatenate(outs).astype(np.float64)
    if source.kind == "torch":
        import torch
        m = source.module.eval().double()
        try:
            with torch.no_grad():
                return m(torch.as_tensor(x, dtype=torch.float64)).numpy()
        finally:
            m.float()
    raise EpcError(f"--verify needs an ONNX or PyTorch source, not {source.kind}")


def verify_against_source(source: Source, energy: Graph, *, batch: int = 4,
                          seed: int = 0) -> float:
    """Largest relative error between one feedforward sweep of the energy graph (feedback
    off, bounds lifted) and the source model on random inputs. Raises EpcError above
    VERIFY_RTOL."""
    import torch
    from .reference import forward_sweep
    inp = energy.inputs[0]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *inp.shape))
    want = _source_outputs(source, x).reshape(batch, -1)
    got_t = torch.as_tensor(forward_sweep(energy, {inp.name: x})[energy.output_state().name])
    got_t = got_t.reshape(batch, -1)
    last = source.graph.nodes[-1].op if source.graph.nodes else None
    if isinstance(last, Softmax):  # canonicalize drops an output softmax: compare after it
        got_t = torch.log_softmax(got_t, 1) if last.log else torch.softmax(got_t, 1)
    got = got_t.numpy()
    if got.shape != want.shape:
        raise EpcError(f"--verify: compiled output has shape {list(got.shape[1:])}, source "
                       f"model gives {list(want.shape[1:])}")
    err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))
    if not err <= VERIFY_RTOL:
        raise EpcError(f"--verify failed: largest relative error {err:.3g} > {VERIFY_RTOL:g} "
                       f"between the compiled graph and {source.path}")
    return err
