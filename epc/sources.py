"""Loading what `epc compile` is given, and checking a compiled graph against it.

A source is an ONNX file, an epc bundle (.epc, e.g. a trained checkpoint), an IR text file,
a `module:factory` spec or an in-memory nn.Module. This is the only place that imports the
frontends (the driver connects them to the compiler; libraries below never load files of
another layer's kind), and `--verify` runs the source model itself (onnxruntime, PyTorch).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from epc.compiler.bundle import is_bundle, read_bundle
from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph, Softmax
from epc.compiler.limits import check_memory, numel
from epc.compiler.options import CompileOptions
from epc.compiler.text import looks_like_ir, parse

VERIFY_RTOL = 1e-4


@dataclass
class Source:
    """What was loaded: the graph and how to run the original model (for --verify)."""

    graph: Graph
    kind: str                      # 'onnx' | 'torch' | 'bundle' | 'text' | 'graph'
    path: str
    module: object = None          # the torch module, for kind 'torch'
    meta: dict = field(default_factory=dict)


def looks_like_torch_spec(src: str) -> bool:
    # pkg.module:factory or path/to/file.py:factory; a Windows drive letter is not a spec
    if os.path.exists(src) or ":" not in src:
        return False
    mod, _, attr = src.rpartition(":")
    return bool(mod) and attr.isidentifier()


def read_ir_text(path: str) -> Graph:
    """Parse and verify an IR text file (its first line is checked by the caller)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise EpcError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise EpcError(f"{path}: cannot read ({e.strerror or e})") from None
    g = parse(text, source=path)
    from epc.compiler.verify import verify
    try:
        return verify(g)
    except EpcError as e:
        raise EpcError(f"{path}: {e}") from None


def is_ir_text(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)         # IR text may open with comment lines
    except OSError as e:
        raise EpcError(f"{path}: cannot read ({e.strerror or e})") from None
    return looks_like_ir(head)


def load_source(src: str, *, input_shape: tuple[int, ...] | None = None) -> Source:
    """Load an ONNX file, an epc bundle, an IR text file or a `module:factory` spec."""
    if looks_like_torch_spec(src):
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
    if is_ir_text(src):
        return Source(read_ir_text(src), "text", src)
    from epc.frontends.onnx import load_onnx
    return Source(load_onnx(src), "onnx", src)


def torch_source(module, example_input, *, name: str | None = None) -> Source:
    """A Source for an in-memory nn.Module (the Python API's path)."""
    from epc.frontends.torch import load_torch
    label = name or type(module).__name__
    return Source(load_torch(module, example_input, source=label), "torch", label,
                  module=module)


def teacher_graph(opts: CompileOptions, source: Source) -> Graph | None:
    """The frozen feedforward teacher of --teacher: the source itself or another model."""
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


def looks_untrained(g: Graph) -> bool:
    """Every weight matrix / kernel of the feedforward graph `g` lies within PyTorch's
    initial range, |w| <= 1/sqrt(fan_in) (nn.Linear's and nn.Conv2d's default draw; the
    Hopfield-ResNet example's 0.6x of it too). Training by backprop takes some weight past
    it (the examples' BP-trained teacher: 1.7-7.7x; an `epc backprop` export: 2-3x), so a
    source inside it is taken as a fresh initialisation. Folded batch norms rescale
    weights: an untrained net with BN is not recognised (no warning, never a false one
    about a trained net inside the range, which training does not leave)."""
    mats = [np.asarray(v) for v in g.weights.values()
            if isinstance(v, np.ndarray) and v.ndim >= 2 and int(np.prod(v.shape[1:])) > 1]
    return bool(mats) and all(
        float(np.abs(v).max(initial=0.0)) * math.sqrt(int(np.prod(v.shape[1:]))) <= 1.0 + 1e-3
        for v in mats)


UNTRAINED_TEACHER = ("--teacher source distils from the source model itself, and {src} "
                     "looks untrained (every weight within PyTorch's initial range): it "
                     "teaches nothing; train it first (epc backprop MODEL.epc --onnx "
                     "teacher.onnx) and pass --teacher teacher.onnx")


# --------------------------------------------------------------------------- --verify
def _ort_errors() -> tuple[type, ...]:
    """The exceptions onnxruntime raises for a model it refuses to load or run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as S
    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoModel",
             "NoSuchFile", "NotFound", "NotImplemented", "RuntimeException", "EngineError",
             "EPFail", "ModelLoaded")
    return tuple(getattr(S, n) for n in names if hasattr(S, n))


def _live_model_bytes(path: str) -> bytes:
    """The model with only what its outputs depend on: onnxruntime runs every node of a
    graph, so a dead branch (an unused ConstantOfShape of 2^28 floats) would cost it what
    epc's frontend never spends (it translates and folds only live nodes)."""
    import onnx
    m = onnx.load(path)
    g = m.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    live: set[int] = set()
    stack, seen = [o.name for o in g.output], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in producer and producer[v] not in live:
            live.add(producer[v])
            stack.extend(x for x in g.node[producer[v]].input if x)
    keep = [n for i, n in enumerate(g.node) if i in live]
    used = {x for n in keep for x in n.input} | {o.name for o in g.output}
    dropped = {t.name for t in g.initializer if t.name not in used}
    inits = [t for t in g.initializer if t.name not in dropped]
    inputs = [i for i in g.input if i.name not in dropped]
    del g.node[:]
    g.node.extend(keep)
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.input[:]
    g.input.extend(inputs)
    return m.SerializeToString()


def _onnxruntime_outputs(path: str, x: np.ndarray) -> np.ndarray:
    """The source model's outputs under onnxruntime, the reference --verify compares with.
    A model onnxruntime refuses (epc's frontend accepted it) is refused with
    onnxruntime's reason, on one line; its own log is silenced (severity 4: fatal
    errors only), since the reason comes back as the exception."""
    import onnxruntime as ort
    ort.set_default_logger_severity(4)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    errors = _ort_errors()

    def refused(e: Exception, doing: str) -> EpcError:
        why = " ".join(str(e).split()) or type(e).__name__
        # "[ONNXRuntimeError] : 1 : FAIL : /src/x.h:46 void f(...) <the reason>"
        why = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", why)
        why = re.sub(r"^/\S+:\d+ .*?\)\s+(?=[A-Z\[])", "", why)
        return EpcError(f"{path}: --verify: onnxruntime cannot {doing} the model: "
                        f"{why[:400]}")
    try:
        sess = ort.InferenceSession(_live_model_bytes(path), so,
                                    providers=["CPUExecutionProvider"])
    except errors as e:
        raise refused(e, "load") from None
    inp = sess.get_inputs()[0]
    x = x.astype(np.float32)
    fixed = inp.shape[0] if inp.shape else None
    try:
        if not (isinstance(fixed, int) and fixed > 0) or fixed == len(x):
            return np.asarray(sess.run(None, {inp.name: x})[0], dtype=np.float64)
        # a model exported with a fixed batch size (often 1): run it that many at a time,
        # the last chunk filled up with repeated rows
        outs = []
        for i in range(0, len(x), fixed):
            chunk = x[i:i + fixed]
            pad = np.concatenate([chunk, np.repeat(chunk[:1], fixed - len(chunk), 0)])
            outs.append(sess.run(None, {inp.name: pad})[0][:len(chunk)])
        return np.concatenate(outs).astype(np.float64)
    except errors as e:
        raise refused(e, "run") from None


def _source_outputs(source: Source, x: np.ndarray) -> np.ndarray:
    if source.kind == "onnx":
        return _onnxruntime_outputs(source.path, x)
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

    from epc.compiler.reference import forward_sweep
    inp = energy.inputs[0]
    per_sample = sum(numel(v.shape) for v in [*energy.inputs, *energy.states])
    check_memory(batch * per_sample * 8 * 2, f"--verify's {batch} random samples",
               source.path)
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
    if not (np.all(np.isfinite(want)) and np.all(np.isfinite(got))):
        bad = "the source model" if not np.all(np.isfinite(want)) else "the compiled graph"
        raise EpcError(f"--verify failed: {bad} gives NaN or Inf on random normal inputs "
                       f"({source.path})")
    with np.errstate(all="ignore"):     # (a difference past float64's range is inf)
        err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))
    if not err <= VERIFY_RTOL:
        raise EpcError(f"--verify failed: largest relative error {err:.3g} > {VERIFY_RTOL:g} "
                       f"between the compiled graph and {source.path}")
    return err
