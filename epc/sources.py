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


def load_source(src: str, *, input_shape: tuple[int, ...] | None = None,
                substitute: bool = False) -> Source:
    """Load an ONNX file, an epc bundle, an IR text file or a `module:factory` spec;
    `substitute`: a model's smooth ops and gates become their nearest linear forms."""
    if looks_like_torch_spec(src):
        module, example = _spec_module(src, input_shape)
        return torch_source(module, example, name=src, substitute=substitute)
    kind = _file_kind(src)
    if kind == "bundle":
        b = read_bundle(src)
        return Source(b.graph, "bundle", src, meta={"target": b.target, **b.meta})
    if kind == "text":
        return Source(read_ir_text(src), "text", src)
    from epc.frontends.onnx import load_onnx
    return Source(load_onnx(src, substitute=substitute), "onnx", src)


def _spec_module(src: str, input_shape):
    if not input_shape:
        raise EpcError(f"{src}: a PyTorch module spec needs --input-shape, "
                       f"e.g. --input-shape 1,3,32,32")
    from epc.frontends.torch import build_module_from_spec
    return build_module_from_spec(src, input_shape)


def _file_kind(src: str) -> str:
    if not os.path.exists(src):
        raise EpcError(f"{src}: no such file")
    if os.path.isdir(src):
        raise EpcError(f"{src}: is a directory, expected an ONNX file, an epc bundle or IR text")
    if is_bundle(src):
        return "bundle"
    if is_ir_text(src):
        return "text"
    return "onnx"


def torch_source(module, example_input, *, name: str | None = None,
                 substitute: bool = False) -> Source:
    """A Source for an in-memory nn.Module (the Python API's path)."""
    from epc.frontends.torch import load_torch
    label = name or type(module).__name__
    return Source(load_torch(module, example_input, source=label, substitute=substitute),
                  "torch", label, module=module)


def survey_source(src, *, input_shape: tuple[int, ...] | None = None,
                  example_input=None, substitute: bool = False) -> dict:
    """The frontend's survey of a model (`epc compile --check`): ops translated, every
    refusal, the graph when nothing was refused; plus 'source' and 'kind'. `src` is a
    path, a `module:factory` spec or an nn.Module (with example_input)."""
    if not isinstance(src, str):
        from epc.frontends.torch import survey_torch
        label = type(src).__name__
        r = survey_torch(src, example_input, source=label, substitute=substitute)
        return {**r, "source": label, "kind": "torch", "module": src}
    if looks_like_torch_spec(src):
        from epc.frontends.torch import survey_torch
        module, example = _spec_module(src, input_shape)
        r = survey_torch(module, example, source=src, name=src.rpartition(":")[2],
                         substitute=substitute)
        return {**r, "source": src, "kind": "torch", "module": module}
    kind = _file_kind(src)
    if kind != "onnx":
        raise EpcError(f"{src}: --check surveys a source model (ONNX or PyTorch); this is "
                       f"{'an epc bundle' if kind == 'bundle' else 'IR text'}")
    from epc.frontends.onnx import survey_onnx
    return {**survey_onnx(src, substitute=substitute), "source": src, "kind": "onnx"}


def teacher_graph(opts: CompileOptions, source: Source) -> Graph | None:
    """The frozen feedforward teacher of --teacher: the source itself or another model."""
    if opts.teacher is None:
        return None
    if opts.teacher == "source":
        if source.graph.is_energy:
            raise EpcError(f"{source.path}: --teacher source needs a feedforward source "
                           f"(ONNX or PyTorch), this is an already compiled graph")
        return source.graph.copy()
    # a `module:factory` teacher is traced on the student's input (batch 1): the shape
    # check in the teacher pass then compares what the two actually compute
    first = source.graph.inputs[0].shape if source.graph.inputs else None
    t = load_source(opts.teacher, input_shape=(1, *first) if first else None)
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
@dataclass
class Verified:
    """What --verify measured: the largest relative error of the compiled graph's output
    against the source model's (before a dropped output softmax: the logits), the share
    of the random inputs on which both pick the same class, and whether the graph was
    compiled with --substitute (then the error is the deviation the substitution made,
    reported, not checked)."""

    error: float
    agreement: float
    samples: int
    substituted: str | None = None


def _softmax_input(model) -> str | None:
    """The input of the Softmax/LogSoftmax producing the ONNX graph's output, if it is."""
    out = model.graph.output[0].name
    for n in model.graph.node:
        if out in n.output and n.op_type in ("Softmax", "LogSoftmax"):
            return n.input[0]
    return None


def _ort_errors() -> tuple[type, ...]:
    """The exceptions onnxruntime raises for a model it refuses to load or run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as S
    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoModel",
             "NoSuchFile", "NotFound", "NotImplemented", "RuntimeException", "EngineError",
             "EPFail", "ModelLoaded")
    return tuple(getattr(S, n) for n in names if hasattr(S, n))


def _live_model_bytes(path: str, logits: bool = False) -> bytes:
    """The model with only what its outputs depend on: onnxruntime runs every node of a
    graph, so a dead branch (an unused ConstantOfShape of 2^28 floats) would cost it what
    epc's frontend never spends (it translates and folds only live nodes). With `logits`
    the output is the input of an output Softmax/LogSoftmax (the softmax is dropped)."""
    import onnx
    m = onnx.load(path)
    g = m.graph
    name = _softmax_input(m) if logits else None
    if name is not None:
        del g.output[:]
        g.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
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


def _onnxruntime_outputs(path: str, x: np.ndarray,
                         logits: bool = False) -> np.ndarray:
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
        sess = ort.InferenceSession(_live_model_bytes(path, logits), so,
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


def _source_outputs(source: Source, x: np.ndarray, logits: bool = False) -> np.ndarray:
    """The source model's outputs on x (float64): onnxruntime, or the module in float64;
    with `logits`, those before the output softmax."""
    if source.kind == "onnx":
        return _onnxruntime_outputs(source.path, x, logits)
    if source.kind == "torch":
        import torch
        m = source.module.eval().double()
        try:
            with torch.no_grad():
                if logits:
                    from epc.frontends.torch import logits_function
                    fn = logits_function(m, torch.as_tensor(x[:1], dtype=torch.float64))
                    return fn(torch.as_tensor(x, dtype=torch.float64)).numpy()
                return m(torch.as_tensor(x, dtype=torch.float64)).numpy()
        finally:
            m.float()
    raise EpcError(f"--verify needs an ONNX or PyTorch source, not {source.kind}")


def verify_against_source(source: Source, energy: Graph, *, batch: int = 4,
                          seed: int = 0) -> Verified:
    """One feedforward sweep of the energy graph (feedback off, bounds lifted) against the
    source model on random inputs: the largest relative error, max |a - b| / max |b|,
    which does not depend on the weights' scale. Where the compiler dropped an output
    softmax, the logits are compared (after a softmax, logits of 1e31 saturate to one-hot
    and any rounding difference shows as a relative error of order 1). Raises EpcError
    above VERIFY_RTOL, unless the graph was compiled with --substitute: then the
    deviation is reported (Verified.substituted says what changed)."""
    import torch

    from epc.compiler.reference import forward_sweep
    substituted = energy.attrs.get("substituted")
    batch = max(batch, 8) if substituted else batch
    inp = energy.inputs[0]
    per_sample = sum(numel(v.shape) for v in [*energy.inputs, *energy.states])
    check_memory(batch * per_sample * 8 * 2, f"--verify's {batch} random samples",
               source.path)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *inp.shape))
    last = source.graph.nodes[-1].op if source.graph.nodes else None
    dropped = isinstance(last, Softmax)  # canonicalize drops an output softmax
    want = _source_outputs(source, x, logits=dropped).reshape(batch, -1)
    got_t = torch.as_tensor(forward_sweep(energy, {inp.name: x})[energy.output_state().name])
    got = got_t.reshape(batch, -1).numpy()
    if got.shape != want.shape:
        raise EpcError(f"--verify: compiled output has shape {list(got.shape[1:])}, source "
                       f"model gives {list(want.shape[1:])}")
    if not (np.all(np.isfinite(want)) and np.all(np.isfinite(got))):
        bad = "the source model" if not np.all(np.isfinite(want)) else "the compiled graph"
        raise EpcError(f"--verify failed: {bad} gives NaN or Inf on random normal inputs "
                       f"({source.path})")
    with np.errstate(all="ignore"):     # (a difference past float64's range is inf)
        err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-300))
    agree = float(np.mean(got.argmax(1) == want.argmax(1)))
    if not substituted and not err <= VERIFY_RTOL:
        raise EpcError(f"--verify failed: largest relative error {err:.3g} > {VERIFY_RTOL:g} "
                       f"between the compiled graph and {source.path}"
                       + (" (logits, before the output softmax)" if dropped else ""))
    return Verified(err, agree, batch, substituted)
