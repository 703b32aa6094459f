"""ONNX frontend: an .onnx file -> the feedforward form of the epc IR.

`load_onnx(path)` reads the model (refusing external data that points outside the model's
folder), checks it with onnx.checker and ONNX shape inference, folds every subgraph that
only depends on constants (the Constant / Shape / Gather / Unsqueeze / Concat / Cast chains
both torch exporters emit), and translates the remaining operators one by one, each by a
rule in `_RULES` that makes one call to the frontend Builder (frontends/builder.py, shared
with the PyTorch frontend: it decides what the IR looks like, folds, and names). Shapes in
the IR are per sample: the first dimension of the single data input is the batch
(symbolic or any integer); every other dimension must be static. Each translated value's
shape is cross-checked against ONNX shape inference.

Anything outside the supported subset raises `EpcError` naming the file, the op type and
the node, and listing what is supported.
"""
from __future__ import annotations

import ast
import math
import os

import networkx as nx
import numpy as np

from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph
from epc.compiler.limits import check_memory, memory_limit, numel
from epc.compiler.verify import problems

from .builder import Builder, Value
from .common import Refused, Unsupported, sanitize

MIN_OPSET, MAX_OPSET = 9, 23

SUPPORTED_OPS = (
    "Conv (2-D), Gemm, MatMul (by a constant 2-D matrix), Relu, Clip (a max alone only "
    "right after a Relu or Clip), HardSigmoid, "
    "BatchNormalization (inference), Mul/Div by a per-channel constant, Add/Sub of a constant "
    "(bias), Add/Sum of same-shaped values (residual), Concat along the channels, Split and "
    "Slice (step 1, not the batch), MaxPool, AveragePool, GlobalAveragePool, ReduceMean "
    "over the spatial axes, Flatten, Reshape and Transpose that flatten or permute the "
    "elements (a channel shuffle), Pad (constant), Identity, Dropout (inference), Cast "
    "(float to float), Softmax/LogSoftmax (at the output only), plus any operator whose "
    "inputs are all constants (folded); with --substitute also Sigmoid, Tanh, HardSwish, "
    "Gelu, Mish, Softplus, Elu, LeakyRelu and squeeze-excitation gates (Mul)")

# Ops without a rule whose refusal says more than 'unsupported'.
_WHY_NOT = {
    "LRN": "local response normalisation divides by a power of a sum of squares: not "
           "linear, no substitution",
    "LayerNormalization": "it normalises by statistics of the value itself: no bilinear "
                          "energy term, no substitution",
    "InstanceNormalization": "it normalises by statistics of the value itself: no bilinear "
                             "energy term, no substitution",
    "Erf": "a GELU written out with Erf; export at opset 20, where GELU is one Gelu node, "
           "or compile the PyTorch module, for --substitute to replace it",
    "PRelu": "a learned negative slope has no clipped form, no substitution",
    "Resize": "resampling is not supported",
    "Upsample": "resampling is not supported",
}

# Ops never evaluated at load time even if their inputs are constant: control flow and
# randomness have no single constant value.
_NO_FOLD = {"Loop", "If", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike",
            "RandomUniformLike", "Multinomial", "Bernoulli", "SequenceConstruct"}

_FLOAT_TYPES = {1, 10, 11, 16}   # FLOAT, FLOAT16, DOUBLE, BFLOAT16 (onnx.TensorProto ids)

# Stand-in for the symbolic batch size inside folded shape tensors (Shape(x) of an
# activation); only shape-plumbing ops may carry it (see _fold_symbolic).
_BATCH = np.int64(-(2 ** 62) + 12345)


def _label(node) -> str:
    name = node.name or (node.output[0] if node.output else "?")
    return f"{node.op_type} node '{name}'"


class _Ctx:
    """State of one import: constants, translated values, the Builder."""

    def __init__(self, path: str, model, opset: int):
        self.path, self.model, self.opset = path, model, opset
        self.const: dict[str, np.ndarray] = {}
        self.values: dict[str, Value] = {}                  # onnx value -> translated Value
        self.b: Builder | None = None
        self.inferred_full: dict[str, tuple] = {}           # onnx value -> inferred dims
        self.sym_shapes: dict[str, list] = {}               # onnx value -> [BATCH, *dims]
        self.used: set[str] = set()
        self.batch = -999
        self.folded = 0                                     # bytes of constants folded
        # a dynamo export records each node's module path (name_scopes); the nodes its
        # optimizer makes afterwards (a Split from aten.split) have none: they are the root's
        self.scoped = any(p.key == "pkg.torch.onnx.name_scopes"
                          for n in model.graph.node for p in n.metadata_props)

    # ---- errors
    def fail(self, node, msg: str) -> Refused:
        return Refused(f"{self.path}: {_label(node)}: {msg}", op=node.op_type,
                       node=_label(node).split(" ", 1)[1], reason=msg)

    def unsupported(self, node, why: str = "") -> Refused:
        detail = f" ({why})" if why else ""
        return Refused(f"{self.path}: unsupported {_label(node)}{detail}; epc supports: "
                       f"{SUPPORTED_OPS}", op=node.op_type,
                       node=_label(node).split(" ", 1)[1], reason=why or "no rule for this op")

    # ---- inputs of the node being translated
    def data(self, node, i: int) -> Value:
        """The translated non-constant value of input i."""
        if i >= len(node.input) or not node.input[i]:
            raise self.fail(node, f"missing input {i}")
        x = node.input[i]
        if x not in self.values:
            raise self.fail(node, f"input {x!r} must be a computed value, not a constant")
        return self.values[x]

    def constant(self, node, i: int, what: str, optional: bool = False):
        if i >= len(node.input) or not node.input[i]:
            if optional:
                return None
            raise self.fail(node, f"missing {what}")
        x = node.input[i]
        if x not in self.const:
            raise self.unsupported(node, f"its {what} ({x!r}) must be a constant")
        return self.const[x]


# =========================================================================== loading
def _read_model(path: str):
    import onnx
    from google.protobuf.message import DecodeError

    if not os.path.exists(path):
        raise EpcError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise EpcError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise EpcError(f"{path}: cannot read: {e.strerror or e}") from None
    if not data:
        raise EpcError(f"{path}: empty file, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise EpcError(f"{path}: not a valid ONNX model (protobuf decoding failed: {e}); the "
                       f"file is truncated or not ONNX") from None
    # Protobuf decodes many non-ONNX byte strings without complaint; a real model has an IR
    # version, an opset import and a graph with at least one output.
    if model.ir_version <= 0 or not model.opset_import or not model.graph.output:
        raise EpcError(f"{path}: not an ONNX model (no IR version, opset or graph outputs); "
                       f"the file is truncated or not ONNX")
    bad = next((v for v in _names(model) if not isinstance(v, str)), None)
    if bad is not None:       # protobuf hands a string field that is not UTF-8 over as bytes
        raise EpcError(f"{path}: not a valid ONNX model: the name {bytes(bad)[:40]!r} is not "
                       f"UTF-8 text")
    return model


def _names(model):
    """Every name and key of the model's graph (what the import reads as text)."""
    g = model.graph
    for o in model.opset_import:
        yield o.domain
    for p in model.metadata_props:
        yield from (p.key, p.value)
    for vi in [*g.input, *g.output, *g.value_info]:
        yield vi.name
        t = vi.type.tensor_type
        for d in t.shape.dim:
            yield d.dim_param
    for t in g.initializer:
        yield t.name
    for n in g.node:
        yield from (n.name, n.op_type, n.domain, *n.input, *n.output)
        for a in n.attribute:
            yield a.name
        for p in n.metadata_props:
            yield from (p.key, p.value)


def _load_external_data(path: str, model) -> None:
    """Load external tensors, refusing any location outside the model's folder."""
    from onnx.external_data_helper import load_external_data_for_tensor

    base = os.path.dirname(os.path.abspath(path))
    real_base = os.path.realpath(base)
    for t in _all_tensors(model):
        if t.data_location != 1:  # TensorProto.EXTERNAL
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc):
            raise EpcError(f"{path}: tensor {t.name!r}: external data location {loc!r} must be "
                           f"a relative path inside the model's folder")
        target = os.path.realpath(os.path.join(base, loc))
        if os.path.commonpath([target, real_base]) != real_base:
            raise EpcError(f"{path}: tensor {t.name!r}: external data {loc!r} points outside "
                           f"the model's folder; refused")
        if not os.path.isfile(target):
            raise EpcError(f"{path}: tensor {t.name!r}: external data file {loc!r} not found")
        try:
            load_external_data_for_tensor(t, base)
        except Exception as e:  # noqa: BLE001 - any read failure is a bad user file
            raise EpcError(f"{path}: tensor {t.name!r}: cannot read external data {loc!r}: "
                           f"{e}") from None
        t.data_location = 0
        del t.external_data[:]


def _all_tensors(model):
    g = model.graph
    yield from g.initializer
    for n in g.node:
        for a in n.attribute:
            if a.type == 4:   # AttributeProto.TENSOR
                yield a.t


def _opset(path: str, model) -> int:
    version = None
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            version = int(o.version)
    if version is None:
        raise EpcError(f"{path}: model imports no default-domain (ai.onnx) opset")
    if not MIN_OPSET <= version <= MAX_OPSET:
        raise EpcError(f"{path}: opset {version} is not supported (epc supports ai.onnx opsets "
                       f"{MIN_OPSET}..{MAX_OPSET}); convert it with onnx.version_converter")
    return version


def _toposort(path: str, model) -> None:
    """Refuse graphs with cycles; put an acyclic graph in topological order (checker needs it)."""
    g = model.graph
    producer = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if o:
                producer[o] = i
    dg = nx.DiGraph()
    dg.add_nodes_from(range(len(g.node)))
    for i, n in enumerate(g.node):
        for x in n.input:
            if x in producer:
                dg.add_edge(producer[x], i)
    if not nx.is_directed_acyclic_graph(dg):
        cyc = nx.find_cycle(dg)
        names = ", ".join(_label(g.node[a]) for a, _ in cyc)
        raise EpcError(f"{path}: the graph contains a cycle through {names}; a feedforward "
                       f"model must be acyclic")
    order = list(nx.lexicographical_topological_sort(dg))
    if order != list(range(len(g.node))):
        nodes = [g.node[i] for i in order]
        copies = [type(n)() for n in nodes]
        for c, n in zip(copies, nodes):
            c.CopyFrom(n)
        del g.node[:]
        g.node.extend(copies)


def _check(path: str, model):
    import onnx

    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - checker raises several exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EpcError(f"{path}: the ONNX checker rejects the model: {msg}") from None
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                                 data_prop=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EpcError(f"{path}: ONNX shape inference fails: {msg}") from None


def _inferred_shapes(model) -> dict[str, tuple]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                 for d in t.shape.dim)
    return out


# =========================================================================== folding
def _fold_symbolic(node, vals: list, opset: int):
    """Shape plumbing on int arrays that may hold the batch stand-in; None if not handled."""
    t = node.op_type
    attrs = {a.name: a for a in node.attribute}

    def ints(name, default=None):
        return list(attrs[name].ints) if name in attrs else default

    if t in ("Identity",):
        return vals[0]
    if t == "Cast":
        return vals[0].astype(np.int64) if attrs["to"].i == 7 else None
    if t == "Gather":
        axis = attrs["axis"].i if "axis" in attrs else 0
        return np.take(vals[0], vals[1].astype(np.int64), axis=axis)
    if t == "Unsqueeze":
        axes = ints("axes") if opset < 13 else [int(a) for a in vals[1]]
        out = vals[0]
        rank = out.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            out = np.expand_dims(out, a)
        return out
    if t == "Squeeze":
        axes = ints("axes") if opset < 13 else (
            [int(a) for a in vals[1]] if len(vals) > 1 and vals[1] is not None else None)
        return np.squeeze(vals[0], axis=tuple(axes) if axes else None)
    if t == "Concat":
        return np.concatenate([np.atleast_1d(v) for v in vals], axis=attrs["axis"].i)
    if t == "Slice" and opset >= 10:
        starts, ends = vals[1], vals[2]
        axes = vals[3] if len(vals) > 3 and vals[3] is not None else range(len(starts))
        steps = vals[4] if len(vals) > 4 and vals[4] is not None else [1] * len(starts)
        sl = [slice(None)] * vals[0].ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            big = np.iinfo(np.int64).max
            sl[int(a)] = slice(int(s), None if int(e) >= big // 2 else int(e), int(st))
        return vals[0][tuple(sl)]
    return None


def _evaluate(node, vals: list, ctx: _Ctx) -> list[np.ndarray]:
    """Evaluate one node on constant inputs with the ONNX reference implementation."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    if node.op_type == "Identity":
        return [vals[0]]
    names = [f"in{i}" if x else "" for i, x in enumerate(node.input)]
    n2 = helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.output))],
                          domain=node.domain)
    n2.attribute.extend(node.attribute)
    inits = [numpy_helper.from_array(np.asarray(v), nm) for nm, v in zip(names, vals) if nm]
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
            for o in n2.output]
    g = helper.make_graph([n2], "fold", [], outs, initializer=inits)
    m = helper.make_model(g, opset_imports=list(ctx.model.opset_import),
                          ir_version=ctx.model.ir_version)
    res = ReferenceEvaluator(m).run(None, {})
    return [np.asarray(r) for r in res]


# ops whose output is the broadcast of their inputs (elementwise), for the size bound
_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "Equal",
    "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not", "Neg",
    "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Relu",
    "Sigmoid", "Tanh", "Clip", "Erf", "Cos", "Sin", "BitShift", "PRelu", "IsNaN", "IsInf",
    "Cast", "CastLike", "Identity", "Softmax", "LogSoftmax", "HardSigmoid", "LeakyRelu",
    "Elu", "Selu", "Softplus", "Softsign"}
# shape plumbing that never makes more elements than its inputs hold
_SHRINKING = {"Shape", "Size", "Unsqueeze", "Squeeze", "Concat", "Slice", "Reshape",
              "Flatten", "Transpose", "Split", "ReduceSum", "ReduceMean", "ReduceMax",
              "ReduceMin", "ReduceProd", "ArgMax", "ArgMin"}


def _fold_elements(ctx: _Ctx, node, vals: list) -> int | None:
    """An upper bound on the elements node's outputs will hold, before evaluating it on
    constant inputs (None: unknown). ONNX shape inference gives most; the ops that make
    large tensors from small inputs are computed from their constant inputs."""
    dims = [ctx.inferred_full.get(o) for o in node.output if o]
    if dims and all(d is not None and all(isinstance(x, int) for x in d) for d in dims):
        return sum(numel(d) for d in dims)
    t = node.op_type
    arrs = [np.asarray(v) for v in vals if v is not None]
    ints = lambda v: [int(x) for x in np.asarray(v).reshape(-1)]   # noqa: E731
    try:
        if t == "ConstantOfShape":
            return numel(ints(arrs[0]))
        if t == "Expand":
            want = ints(arrs[1])
            rank = max(len(want), arrs[0].ndim)
            a = [1] * (rank - arrs[0].ndim) + list(arrs[0].shape)
            b = [1] * (rank - len(want)) + want
            return numel(max(abs(x), abs(y)) for x, y in zip(a, b))
        if t == "Tile":
            return numel(d * abs(r) for d, r in zip(arrs[0].shape, ints(arrs[1])))
        if t == "Range":
            start, limit, delta = (float(np.asarray(v).reshape(-1)[0]) for v in arrs[:3])
            if delta == 0 or not all(map(math.isfinite, (start, limit, delta))):
                return None
            return max(int(math.ceil((limit - start) / delta)), 0)
        if t == "Gather":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            data, idx = arrs[0], arrs[1]
            return numel(idx.shape) * (data.size // max(data.shape[axis], 1)
                                       if data.ndim else 1)
    except (IndexError, ValueError, TypeError, OverflowError):
        return None      # malformed: the evaluation reports it
    if t in _ELEMENTWISE and arrs:
        rank = max(a.ndim for a in arrs)
        shapes = [[1] * (rank - a.ndim) + list(a.shape) for a in arrs]
        return numel(max(col) for col in zip(*shapes))
    if t in _SHRINKING:
        return sum(a.size for a in arrs)
    return None


def _fold_constants(ctx: _Ctx, needed: set[int]) -> None:
    """Evaluate every node the outputs need whose inputs are all constant; their outputs
    become constants. A node nothing needs is not evaluated (a dead branch costs nothing),
    and what is folded is counted against the size limit before it is made."""
    g = ctx.model.graph
    for i, node in enumerate(g.node):
        if i not in needed:
            continue
        if not _fold_node(ctx, node):
            _propagate_shape(ctx, node)


def _fold_node(ctx: _Ctx, node) -> bool:
    """Fold one node whose inputs are constants (or a Shape of a value whose per-sample
    shape is known): its outputs into ctx.const; False if it is not foldable here.
    Translation calls it too, for shape plumbing that reads a value ONNX shape inference
    could not size (after a Reshape to a computed shape: torchvision's channel shuffle
    exported with a dynamic batch) but the translation did."""
    if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD:
        return False
    if node.op_type == "Shape":
        x = node.input[0]
        if x in ctx.sym_shapes:
            full = ctx.sym_shapes[x]
        elif x in ctx.values:      # translated: [batch stand-in, *per-sample shape]
            full = [_BATCH] + [int(d) for d in ctx.values[x].shape]
        else:
            return False
        # Shape of an activation: static except for the batch stand-in.
        shp = np.array(full, dtype=np.int64)
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(shp))
        ctx.const[node.output[0]] = shp[start:end]
        return True
    ins = [x for x in node.input if x]
    if not ins and node.op_type not in ("Constant",):
        return False
    if not all(x in ctx.const for x in ins):
        return False
    vals = [ctx.const[x] if x else None for x in node.input]
    symbolic = any(v is not None and v.dtype == np.int64 and np.any(v == _BATCH)
                   for v in vals)
    if not symbolic:
        n = _fold_elements(ctx, node, vals)
        if n is None:
            raise ctx.unsupported(node, "its inputs are constant but the size of its "
                                        "result cannot be bounded before folding it")
        check_memory(2 * (ctx.folded + n * 8), f"folding constants up to {_label(node)}",
                     ctx.path)
    try:
        if symbolic:
            out = _fold_symbolic(node, vals, ctx.opset)
            if out is None:
                return False   # left for translation, which will refuse it by name
            outs = [out]
        else:
            outs = _evaluate(node, vals, ctx)
    except EpcError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - reference evaluation of a user constant
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ctx.fail(node, f"cannot evaluate on constant inputs: {msg}") from None
    for o, v in zip(node.output, outs):
        if o:
            v = np.asarray(v)
            if v.dtype.kind not in "fiub":
                raise ctx.unsupported(node, f"folding it gives {v.dtype} data (epc "
                                            f"folds real numbers)")
            ctx.folded += v.nbytes
            check_memory(2 * ctx.folded, f"folding constants up to {_label(node)}", ctx.path)
            ctx.const[o] = v
    return True


def _propagate_shape(ctx: _Ctx, node) -> None:
    """Track full shapes (batch as stand-in) of activations for Shape folding."""
    for o in node.output:
        if o in ctx.inferred_full:
            dims = ctx.inferred_full[o]
            if dims and all(d is not None for d in dims[1:]):
                ctx.sym_shapes[o] = [_BATCH] + [int(d) for d in dims[1:]]


# =========================================================================== translation
# One rule per ONNX op: read the node's attributes and constant inputs, check what only
# the ONNX form can get wrong, and make one Builder call (frontends/builder.py decides what
# the IR looks like). Each returns the Value of the node's first output.
def _attrs(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ints(v) -> list[int]:
    return [int(x) for x in v]


def _scope(node, scoped: bool = False) -> str:
    """Where node came from: the module path a torch exporter recorded (the dynamo
    exporter's name_scopes metadata, or a legacy node name '/stages/stages.0/conv1/Conv'),
    else the root ('') in a model whose other nodes carry name_scopes (`scoped`), else
    the node's own name (or its first output's)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":   # ['', 'stages', 'stages.0', 'relu_1']
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                break
            if isinstance(scopes, list) and len(scopes) >= 2:
                return str(scopes[-2])
            break
    else:
        if scoped:
            return ""
    if node.name.startswith("/"):
        # legacy: one component per module, the op last; the child of a container shows
        # as 'stages.0' under 'stages', any other child by its attribute name ('conv1')
        path, prev = "", ""
        for part in node.name.strip("/").split("/")[:-1]:
            if prev and part.startswith(prev + "."):
                path += part[len(prev):]
            else:
                path = f"{path}.{part}" if path else part
            prev = part
        return path
    return node.name or node.output[0]


def _auto_pads(ctx, node, auto_pad, in_hw, kernel, stride, dil) -> list[int] | None:
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("", "NOTSET"):
        return None
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(in_hw, kernel, stride, dil):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            b, e = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
            begin.append(b)
            end.append(e)
        return begin + end
    raise ctx.fail(node, f"auto_pad {auto_pad!r} is not supported")


def _window(ctx, node, a, x, kernel) -> tuple[list[int], list[int], list[int]]:
    """(stride, dilation, pads) of a Conv / pool node over the [C, H, W] value x."""
    stride = _ints(a.get("strides", [1, 1]))
    dil = _ints(a.get("dilations", [1, 1]))
    for what, v, n, lo in (("kernel_shape", kernel, 2, 1), ("strides", stride, 2, 1),
                           ("dilations", dil, 2, 1), ("pads", _ints(a.get("pads", [0] * 4)),
                                                      4, 0)):
        if len(v) != n or any(not lo <= d <= 1 << 20 for d in v):
            raise ctx.fail(node, f"{what} {v}: expected {n} integers >= {lo} (2-D)")
    auto_pad = a.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode("utf-8", "replace")
    if auto_pad not in ("", "NOTSET") and "pads" in a:
        # onnxruntime refuses this combination too
        raise ctx.fail(node, f"both auto_pad {auto_pad!r} and explicit pads are given "
                             f"(auto_pad computes the pads; give one or the other)")
    pads = _auto_pads(ctx, node, auto_pad, x.shape[1:], kernel, stride, dil)
    return stride, dil, (pads if pads is not None else _ints(a.get("pads", [0, 0, 0, 0])))


def _conv(ctx, node, a):
    x = ctx.data(node, 0)
    w = ctx.constant(node, 1, "weight")
    b = ctx.constant(node, 2, "bias", optional=True)
    if w.ndim != 4 or len(x.shape) != 3:
        raise ctx.unsupported(node, f"only 2-D convolution is supported; weight has rank "
                                    f"{w.ndim}, input per-sample shape {list(x.shape)}")
    k = _ints(a.get("kernel_shape", w.shape[2:]))
    if k != list(w.shape[2:]):
        raise ctx.fail(node, f"kernel_shape {k} does not match weight {list(w.shape)}")
    stride, dil, pads = _window(ctx, node, a, x, k)
    return ctx.b.conv(x, w, b, stride=stride, pads=pads, dilation=dil,
                      groups=int(a.get("group", 1)), name=node.input[1])


def _gemm(ctx, node, a):
    x = ctx.data(node, 0)
    if int(a.get("transA", 0)):
        raise ctx.unsupported(node, "transA=1 (the batch must be the first axis)")
    b = ctx.constant(node, 1, "weight matrix B")
    c = ctx.constant(node, 2, "bias C", optional=True)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise ctx.fail(node, f"alpha {alpha} and beta {beta} must be finite numbers")
    w = b if int(a.get("transB", 0)) else b.T
    if alpha != 1.0:
        w = w.astype(np.float64) * alpha
    bias = None if c is None or beta == 0.0 else np.asarray(c, np.float64) * beta
    return ctx.b.dense(x, w, bias, name=node.input[1])


def _matmul(ctx, node, a):
    x = ctx.data(node, 0)
    if len(node.input) > 1 and node.input[1] in ctx.values:
        raise ctx.unsupported(node, "MatMul of two computed values (attention): no bilinear "
                                    "energy term, no substitution")
    ctx.b.need_rank(x, 1, "MatMul (a matrix product)")
    b = ctx.constant(node, 1, "weight matrix")
    if b.ndim != 2:
        raise ctx.unsupported(node, f"MatMul weight must be 2-D, got {list(b.shape)}")
    return ctx.b.dense(x, b.T, name=node.input[1])


def _binary(ctx, node, a):
    """Add / Sum / Sub / Mul / Div: a residual join of computed values, or a computed value
    and constants (a bias or a per-channel scale)."""
    t = node.op_type
    ins = [x for x in node.input if x]
    dyn = [ctx.values[x] for x in ins if x in ctx.values]
    consts = [np.asarray(ctx.const[x], np.float64) for x in ins if x in ctx.const]
    if len(dyn) + len(consts) != len(ins):
        raise ctx.fail(node, "an input is neither computed nor constant")
    if t == "Mul" and len(dyn) == 2 and not consts:
        return ctx.b.product(dyn[0], dyn[1])
    if t in ("Sub", "Div", "Mul") and len(dyn) != 1:
        raise ctx.unsupported(node, f"{t} of two computed values (only a residual Add/Sum "
                                    f"joins computed values)")
    if t in ("Sub", "Div") and node.input[0] not in ctx.values:
        raise ctx.unsupported(node, f"{t} of a constant by a computed value")
    if t in ("Mul", "Div"):
        return ctx.b.mul_constant(dyn[0], consts[0], divide=t == "Div")
    y = ctx.b.add(dyn)
    if not consts:
        return y
    total = sum(consts)
    if t == "Sub":
        return ctx.b.add_constant(y, -total, "subtraction")
    return ctx.b.add_constant(y, total)


def _clip(ctx, node, a):
    x = ctx.data(node, 0)
    if ctx.opset < 11:
        lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
    else:
        lo_c = ctx.constant(node, 1, "min", optional=True)
        hi_c = ctx.constant(node, 2, "max", optional=True)
        for c in (lo_c, hi_c):
            if c is not None and np.asarray(c).size != 1:
                raise ctx.unsupported(node, "min/max must be scalars")
        lo = -np.inf if lo_c is None else float(np.asarray(lo_c).reshape(-1)[0])
        hi = np.inf if hi_c is None else float(np.asarray(hi_c).reshape(-1)[0])
    return ctx.b.clamp(x, lo, hi)


def _batchnorm(ctx, node, a):
    x = ctx.data(node, 0)
    if int(a.get("training_mode", 0)):
        raise ctx.unsupported(node, "training_mode=1 (export the model in eval mode)")
    if any(o and o in ctx.used for o in node.output[1:]):
        raise ctx.unsupported(node, "its running-statistics outputs are used (training mode)")
    params = [ctx.constant(node, i, what)
              for i, what in enumerate(("scale", "shift", "mean", "var"), start=1)]
    eps = float(a.get("epsilon", 1e-5))
    if not (math.isfinite(eps) and eps >= 0):
        raise ctx.fail(node, f"epsilon {eps} must be a finite number >= 0")
    var = np.asarray(params[3], dtype=np.float64)
    if var.size and not np.all(var + eps > 0):
        raise ctx.fail(node, f"variance + epsilon must be positive (smallest variance "
                             f"{float(var.min()):g}, epsilon {eps:g}): these are not "
                             f"batch-norm statistics")
    return ctx.b.batchnorm(x, *params, epsilon=eps)


def _pool(ctx, node, a):
    x = ctx.data(node, 0)
    ctx.b.need_rank(x, 3, "pooling (2-D only)")
    if len(node.output) > 1 and node.output[1] and node.output[1] in ctx.used:
        raise ctx.unsupported(node, "the Indices output is used")
    k = _ints(a["kernel_shape"])
    stride, dil, pads = _window(ctx, node, a, x, k)
    ceil = bool(a.get("ceil_mode", 0))
    if node.op_type == "MaxPool":
        if int(a.get("storage_order", 0)) and len(node.output) > 1:
            raise ctx.unsupported(node, "storage_order=1")
        return ctx.b.maxpool(x, k, stride, pads, dil, ceil)
    if dil != [1, 1]:
        raise ctx.unsupported(node, "dilated average pooling")
    return ctx.b.avgpool(x, k, stride, pads, bool(a.get("count_include_pad", 0)), ceil)


def _reduce_mean(ctx, node, a):
    x = ctx.data(node, 0)
    if ctx.opset >= 18:
        axes = ctx.constant(node, 1, "axes", optional=True)
        axes = None if axes is None else _ints(np.asarray(axes).reshape(-1))
    else:
        axes = _ints(a["axes"]) if "axes" in a else None
    if axes is None or len(x.shape) != 3 or sorted(ax % 4 for ax in axes) != [2, 3]:
        raise ctx.unsupported(node, f"ReduceMean only over the spatial axes [2, 3] of an "
                                    f"[N, C, H, W] value (axes {axes}, per-sample shape "
                                    f"{list(x.shape)})")
    return ctx.b.global_avgpool(x, keepdims=bool(a.get("keepdims", 1)))


def _flatten(ctx, node, a):
    x = ctx.data(node, 0)
    axis = int(a.get("axis", 1))
    if axis < 0:
        axis += len(x.shape) + 1
    if axis != 1:
        raise ctx.unsupported(node, f"Flatten with axis {a.get('axis', 1)} (only axis 1: keep "
                                    f"the batch, flatten the rest)")
    return ctx.b.flatten(x)


def _reshape(ctx, node, a):
    """A Reshape that keeps the batch axis first (the target's first entry is the batch,
    -1, or 0 = copy) and reshapes the rest; the Builder takes it from there."""
    x = ctx.data(node, 0)
    target = [int(t) for t in np.asarray(ctx.constant(node, 1, "target shape")).reshape(-1)]
    keep_zero = not int(a.get("allowzero", 0))
    n = int(np.prod(x.shape))
    rest = [x.shape[i] if (t == 0 and keep_zero and i < len(x.shape)) else t
            for i, t in enumerate(target[1:])]
    batch_ok = bool(target) and (target[0] in (_BATCH, ctx.batch) or
                                 (target[0] == 0 and keep_zero) or
                                 (target[0] == -1 and -1 not in rest))
    if batch_ok and rest.count(-1) == 1:
        known = int(np.prod([t for t in rest if t != -1]))
        rest = [n // known if t == -1 else t for t in rest] if known and n % known == 0 else []
    if batch_ok and rest and min(rest) > 0 and int(np.prod(rest)) == n:
        return ctx.b.reshape(x, rest)
    shown = ["N" if t == _BATCH else t for t in target]
    raise ctx.unsupported(node, f"Reshape of per-sample {list(x.shape)} to {shown}: the "
                                f"batch axis must stay first and whole (a reshape that mixes "
                                f"samples is not a per-sample permutation)")


def _softmax(ctx, node, a):
    x = ctx.data(node, 0)
    r = len(x.shape) + 1
    axis = int(a.get("axis", 1 if ctx.opset < 13 else -1)) % r
    # the classes: axis 1 of [N, C] or of [N, C, 1, 1] (before opset 13 a Softmax
    # flattens from its axis on, so axis 1 covers C x 1 x 1 there too)
    if axis != 1 or int(np.prod(x.shape[1:])) != 1:
        raise ctx.unsupported(node, f"{node.op_type} only over the class axis of an [N, C] "
                                    f"value (axis {axis}, per-sample shape {list(x.shape)})")
    return ctx.b.softmax(x, log=node.op_type == "LogSoftmax")


def _dropout(ctx, node, a):
    x = ctx.data(node, 0)
    if len(node.input) > 2 and node.input[2]:
        tm = ctx.constant(node, 2, "training_mode")
        if bool(np.asarray(tm).reshape(-1)[0]):
            raise ctx.unsupported(node, "training_mode=true (only inference dropout)")
    if len(node.output) > 1 and node.output[1] and node.output[1] in ctx.used:
        raise ctx.unsupported(node, "its mask output is used")
    return x   # the identity at inference


def _cast(ctx, node, a):
    if int(a["to"]) not in _FLOAT_TYPES:
        raise ctx.unsupported(node, "Cast of a computed value to a non-float type")
    return ctx.data(node, 0)


def _pad(ctx, node, a):
    """A constant Pad (zero or any value; negative pads crop) of the per-sample axes."""
    x = ctx.data(node, 0)
    mode = a.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if ctx.opset < 11:
        pads, value = a.get("pads"), float(a.get("value", 0.0))
    else:
        pads = ctx.constant(node, 1, "pads")
        v = ctx.constant(node, 2, "constant value", optional=True)
        value = 0.0 if v is None or np.asarray(v).size == 0 else float(np.asarray(v).reshape(-1)[0])
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    r = len(x.shape) + 1
    axes = ctx.constant(node, 3, "axes", optional=True) if ctx.opset >= 18 else None
    if axes is not None:
        full = [0] * (2 * r)
        ax = [int(v) % r for v in np.asarray(axes).reshape(-1)]
        for k, axis in enumerate(ax):
            full[axis], full[r + axis] = pads[k], pads[len(ax) + k]
        pads = full
    if len(pads) != 2 * r:
        raise ctx.fail(node, f"pads {pads} for an input of rank {r}")
    if not any(pads):
        return x
    if mode != "constant":
        raise ctx.unsupported(node, f"Pad mode {mode!r} (only constant padding)")
    if pads[0] or pads[r]:
        raise ctx.unsupported(node, f"Pad of the batch axis (pads {pads})")
    return ctx.b.pad(x, pads[1:r] + pads[r + 1:], value)


def _axis(ctx, node, axis: int, rank: int, what: str) -> int:
    """A per-sample axis from an ONNX axis over [N, ...] of `rank`; the batch refused."""
    if not -rank <= axis < rank:
        raise ctx.fail(node, f"axis {axis} out of range for rank {rank}")
    axis %= rank
    if axis == 0:
        raise ctx.unsupported(node, f"{what} along the batch axis")
    return axis - 1


def _concat(ctx, node, a):
    if any(x in ctx.const for x in node.input if x):
        raise ctx.unsupported(node, "concatenation with a constant")
    xs = [ctx.data(node, i) for i in range(len(node.input))]
    axis = _axis(ctx, node, int(a["axis"]), len(xs[0].shape) + 1, "concatenation")
    return ctx.b.concat(xs, axis)


def _split(ctx, node, a):
    x = ctx.data(node, 0)
    axis = _axis(ctx, node, int(a.get("axis", 0)), len(x.shape) + 1, "Split")
    sizes = None
    if ctx.opset >= 13 and len(node.input) > 1 and node.input[1]:
        sizes = [int(v) for v in np.asarray(ctx.constant(node, 1, "split sizes")).reshape(-1)]
    elif "split" in a:
        sizes = [int(v) for v in a["split"]]
    n = len(node.output)
    size = x.shape[axis]
    if sizes is None:
        k = int(a.get("num_outputs", n))
        step = -(-size // k)
        sizes = [min(step, size - i * step) for i in range(k)]
    if sum(sizes) != size or len(sizes) != n or min(sizes) <= 0:
        raise ctx.fail(node, f"split sizes {sizes} of an axis of {size} into {n} outputs")
    out, at = [], 0
    for k in sizes:
        out.append(ctx.b.slice(x, axis, at, at + k))
        at += k
    return tuple(out)


def _slice(ctx, node, a):
    x = ctx.data(node, 0)
    r = len(x.shape) + 1
    if ctx.opset < 10:
        starts, ends = a["starts"], a["ends"]
        axes, steps = a.get("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        starts = np.asarray(ctx.constant(node, 1, "starts")).reshape(-1)
        ends = np.asarray(ctx.constant(node, 2, "ends")).reshape(-1)
        axes = ctx.constant(node, 3, "axes", optional=True)
        steps = ctx.constant(node, 4, "steps", optional=True)
        axes = list(range(len(starts))) if axes is None else np.asarray(axes).reshape(-1)
        steps = [1] * len(starts) if steps is None else np.asarray(steps).reshape(-1)
    y = x
    for st, en, ax, step in zip(starts, ends, axes, steps):
        ax, st, en = int(ax) % r, int(st), int(en)
        if int(step) != 1:
            raise ctx.unsupported(node, f"Slice with step {int(step)} (only step 1)")
        if ax == 0:
            if st == 0 and (en >= 2 ** 31 - 1 or (ctx.batch > 0 and en >= ctx.batch)):
                continue        # the whole batch
            raise ctx.unsupported(node, "Slice of the batch axis")
        size = x.shape[ax - 1]
        st = st + size if st < 0 else st
        en = en + size if en < 0 else en
        y = ctx.b.slice(y, ax - 1, st, min(en, size))
    return y


def _transpose(ctx, node, a):
    x = ctx.data(node, 0)
    r = len(x.shape) + 1
    perm = [int(p) for p in a.get("perm", list(reversed(range(r))))]
    if sorted(perm) != list(range(r)):
        raise ctx.fail(node, f"perm {perm} for rank {r}")
    if perm[0] != 0:
        raise ctx.unsupported(node, f"Transpose {perm} moves the batch axis")
    return ctx.b.transpose(x, [p - 1 for p in perm[1:]])


def _smooth(kind: str):
    return lambda ctx, node, a: ctx.b.smooth(ctx.data(node, 0), kind)


def _global_avgpool(ctx, node, a):
    return ctx.b.global_avgpool(ctx.data(node, 0), keepdims=True)


_RULES = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _matmul,
    "Relu": lambda ctx, node, a: ctx.b.relu(ctx.data(node, 0)),
    "Clip": _clip,
    "HardSigmoid": lambda ctx, node, a: ctx.b.hardsigmoid(
        ctx.data(node, 0), a.get("alpha", 0.2), a.get("beta", 0.5)),
    "BatchNormalization": _batchnorm,
    "Add": _binary, "Sum": _binary, "Sub": _binary, "Mul": _binary, "Div": _binary,
    "MaxPool": _pool, "AveragePool": _pool, "GlobalAveragePool": _global_avgpool,
    "ReduceMean": _reduce_mean, "Flatten": _flatten, "Reshape": _reshape,
    "Softmax": _softmax, "LogSoftmax": _softmax,
    "Identity": lambda ctx, node, a: ctx.data(node, 0),
    "Dropout": _dropout, "Cast": _cast, "Pad": _pad,
    "Concat": _concat, "Split": _split, "Slice": _slice, "Transpose": _transpose,
    "Sigmoid": _smooth("sigmoid"), "Tanh": _smooth("tanh"), "HardSwish": _smooth("hardswish"),
    "Gelu": _smooth("gelu"), "Mish": _smooth("mish"), "Softplus": _smooth("softplus"),
    "Elu": _smooth("elu"), "LeakyRelu": _smooth("leakyrelu"),
}


def _data_input(path: str, model, inits: set[str]):
    g = model.graph
    data = [vi for vi in g.input if vi.name not in inits]
    if len(data) != 1:
        names = ", ".join(vi.name for vi in data) or "none"
        raise EpcError(f"{path}: epc needs exactly one graph input with data, found "
                       f"{len(data)} ({names})")
    vi = data[0]
    t = vi.type
    if not t.HasField("tensor_type") or t.tensor_type.elem_type not in _FLOAT_TYPES:
        raise EpcError(f"{path}: input {vi.name!r} must be a float tensor")
    if not t.tensor_type.HasField("shape"):
        raise EpcError(f"{path}: input {vi.name!r} has no declared shape")
    dims = list(t.tensor_type.shape.dim)
    if len(dims) < 2:
        raise EpcError(f"{path}: input {vi.name!r} must be [N, ...] with a batch axis first "
                       f"and at least one more axis")
    batch = dims[0].dim_value if dims[0].HasField("dim_value") else None
    shape = []
    for i, d in enumerate(dims[1:], start=1):
        if not d.HasField("dim_value") or d.dim_value <= 0:
            sym = d.dim_param or "?"
            raise EpcError(f"{path}: input {vi.name!r} has a dynamic dimension {sym!r} at axis "
                           f"{i}; only the batch axis (0) may be dynamic")
        shape.append(int(d.dim_value))
    return vi.name, batch, tuple(shape)


def load_onnx(path: str, *, substitute: bool = False) -> Graph:
    """Load an ONNX model as a feedforward-form IR graph; raises EpcError on bad input
    (`Unsupported`, naming every op the IR cannot express, when that is the reason).
    substitute: smooth ops become their nearest piecewise-linear form and
    squeeze-excitation gates are dropped (graph.attrs['substituted'] says what changed)."""
    # numpy's overflow / division warnings would print before the error line: every
    # constant the import makes is checked for NaN/Inf instead (Builder.weight)
    with np.errstate(all="ignore"):
        ctx, refusals, _ = _translate(path, substitute)
    if refusals:
        raise Unsupported(ctx.path, refusals, SUPPORTED_OPS)
    return _finish(ctx)


def survey_onnx(path: str, *, substitute: bool = False) -> dict:
    """What `epc compile --check` reports of an ONNX model: every op translated (by source
    op type), every refusal; the graph too when nothing was refused. Raises EpcError only
    for a file that is not a model epc can read at all."""
    with np.errstate(all="ignore"):
        ctx, refusals, ops = _translate(path, substitute)
    graph = None
    if not refusals:
        try:
            graph = _finish(ctx)
        except Unsupported as e:
            refusals = e.refusals
    return {"frontend": "onnx", "ops": ops, "refusals": refusals, "graph": graph,
            "supported": SUPPORTED_OPS}


def _finish(ctx) -> Graph:
    try:
        with np.errstate(all="ignore"):
            graph = ctx.b.finish()
    except Refused as e:
        raise Unsupported(ctx.path, [e], SUPPORTED_OPS) from None
    errs = problems(graph)
    if errs:   # a frontend bug, not the user's: still one line, naming the file
        raise EpcError(f"{ctx.path}: internal error: the imported IR is invalid: "
                       f"{'; '.join(errs[:3])}")
    return graph


def _translate(path: str, substitute: bool) -> tuple[_Ctx, list[Refused], dict[str, int]]:
    """Read, check and fold the model, then translate every node the outputs need,
    collecting refusals (a refused node's outputs get stand-ins of their inferred shapes,
    so the nodes after it are checked too). Returns (ctx, refusals, translated op counts)."""
    path = os.fspath(path)
    model = _read_model(path)
    opset = _opset(path, model)
    _load_external_data(path, model)
    _toposort(path, model)
    names = [n.name for n in model.graph.node if n.name]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise EpcError(f"{path}: two nodes are named {dup!r} (onnxruntime refuses a graph "
                       f"whose node names repeat)")
    inferred_model = _check(path, model)

    ctx = _Ctx(path, model, opset)
    ctx.inferred_full = _inferred_shapes(inferred_model)
    g = model.graph
    from onnx import numpy_helper

    inits = {t.name for t in g.initializer}
    in_name, ctx.batch, in_shape = _data_input(path, model, inits)
    ctx.batch = -999 if ctx.batch is None else ctx.batch   # only compared with Reshape targets
    ctx.inferred_full[in_name] = (None, *in_shape)
    ctx.sym_shapes[in_name] = [_BATCH, *in_shape]
    for t in g.initializer:
        try:
            ctx.const[t.name] = numpy_helper.to_array(t)
        except Exception as e:  # noqa: BLE001
            raise EpcError(f"{path}: initializer {t.name!r} cannot be read: {e}") from None
    for name, arr in ctx.const.items():
        if arr.dtype.kind not in "fiub":
            raise EpcError(f"{path}: initializer {name!r} holds {arr.dtype} data; epc reads "
                           f"real numbers")
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise EpcError(f"{path}: initializer {name!r} contains NaN or Inf values")

    # Only what the outputs depend on is translated (dead branches are ignored).
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    needed, stack = set(), [o.name for o in g.output]
    seen = set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in producer:
            needed.add(producer[v])
            stack.extend(x for x in g.node[producer[v]].input if x)
    ctx.used = {x for i in needed for x in g.node[i].input if x} | {o.name for o in g.output}

    _fold_constants(ctx, needed)
    for name, arr in ctx.const.items():
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise EpcError(f"{path}: constant {name!r} contains NaN or Inf values")

    gname = sanitize(os.path.splitext(os.path.basename(path))[0], "model")
    ctx.b = b = Builder(gname, {"source": path, "frontend": "onnx", "opset": str(opset)},
                        substitute=substitute)
    ctx.values[in_name] = b.input(in_name, in_shape)

    refusals: list[Refused] = []
    ops: dict[str, int] = {}
    unknown: set[str] = set()          # outputs of refused nodes with no inferred shape
    regions = _module_regions(ctx, needed)
    inside = {i for r in regions.values() for i in r[1:]}
    for i, node in enumerate(g.node):
        if i not in needed or i in inside or all(o in ctx.const for o in node.output if o):
            continue
        if any(x in unknown for x in node.input if x):
            unknown.update(o for o in node.output if o)
            continue
        try:
            if _fold_node(ctx, node):     # shape plumbing on a value translated just now
                continue
            if i in regions:
                _translate_region(ctx, regions[i])
                ops["AdaptiveAvgPool2d"] = ops.get("AdaptiveAvgPool2d", 0) + 1
                continue
            _translate_node(ctx, node)
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        except Refused as e:
            refusals.append(e)
            for o in node.output:
                dims = ctx.inferred_full.get(o)
                # a stand-in only of a size the checks after it can afford (a refused
                # Conv with pads of 2^31 infers a shape of 2^34 elements per sample)
                if o and dims and all(d is not None and d > 0 for d in dims[1:]) \
                        and numel(dims[1:]) * 8 <= memory_limit():
                    ctx.values[o] = b.placeholder(dims[1:], e)
                elif o:
                    unknown.add(o)

    for o in g.output:
        if o.name not in ctx.values and o.name not in unknown:
            raise EpcError(f"{path}: graph output {o.name!r} is a constant, not computed from "
                           f"the input")
        if not refusals:
            b.output(ctx.values[o.name])
    return ctx, refusals, ops


# torch modules whose dynamo export decomposes into many ops (an adaptive pool whose windows
# differ in size becomes Transpose/GatherND/Where/Gather/Add/Div): the nodes a module made
# are taken back as the one op the module is, read from the exporter's metadata
_MODULES = {"torch.nn.modules.pooling.AdaptiveAvgPool2d"}


def _meta_list(node, key: str) -> list:
    for p in node.metadata_props:
        if p.key == key:
            try:
                v = ast.literal_eval(p.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return []
            return v if isinstance(v, list) else []
    return []


def _module_regions(ctx: _Ctx, needed: set[int]) -> dict[int, list[int]]:
    """first node -> the nodes (in order) of each call of a module in _MODULES that the
    exporter wrote as more than one node to translate."""
    calls: dict[tuple, list[int]] = {}
    for i, node in enumerate(ctx.model.graph.node):
        if i not in needed or all(o in ctx.const for o in node.output if o):
            continue
        hier = _meta_list(node, "pkg.torch.onnx.class_hierarchy")
        scopes = _meta_list(node, "pkg.torch.onnx.name_scopes")
        if len(hier) >= 2 and hier[-2] in _MODULES and len(scopes) == len(hier):
            calls.setdefault((tuple(scopes[:-1]), hier[-2]), []).append(i)
    return {r[0]: r for r in calls.values() if len(r) > 1}


def _translate_region(ctx: _Ctx, region: list[int]) -> None:
    """The nodes of one module call as the module's op: one computed input, one output."""
    g = ctx.model.graph
    nodes = [g.node[i] for i in region]
    made = {o for n in nodes for o in n.output if o}
    ins = {x for n in nodes for x in n.input if x and x not in made and x in ctx.values}
    later = {x for j, n in enumerate(g.node) if j not in region for x in n.input}
    outs = [o for o in made if o in later or o in {v.name for v in g.output}]
    first = nodes[0]
    if len(ins) != 1 or len(outs) != 1:
        raise ctx.unsupported(first, f"the {len(nodes)} nodes exported from one "
                                     f"AdaptiveAvgPool2d have {len(ins)} inputs and "
                                     f"{len(outs)} outputs (expected one of each)")
    dims = ctx.inferred_full.get(outs[0])
    if not dims or len(dims) != 4 or any(d is None for d in dims[2:]):
        raise ctx.unsupported(first, "an adaptive average pool whose output shape ONNX shape "
                                     "inference does not know")
    ctx.b.at(_scope(first, ctx.scoped), lambda msg, node=first: ctx.unsupported(node, msg))
    y = ctx.b.adaptive_avgpool(ctx.values[ins.pop()], [int(dims[2]), int(dims[3])])
    ctx.values[outs[0]] = y
    _cross_check(ctx, first, outs[0], y)


def _translate_node(ctx: _Ctx, node) -> None:
    """One node through its rule (its outputs' Values into ctx.values); raises Refused."""
    if node.domain not in ("", "ai.onnx"):
        raise ctx.unsupported(node, f"operator domain {node.domain!r}")
    if node.op_type not in _RULES:
        raise ctx.unsupported(node, _WHY_NOT.get(node.op_type, ""))
    if not any(x in ctx.values for x in node.input if x):
        raise ctx.unsupported(node, "its inputs could not be evaluated as constants")
    ctx.b.at(_scope(node, ctx.scoped), lambda msg, node=node: ctx.unsupported(node, msg))
    try:
        y = _RULES[node.op_type](ctx, node, _attrs(node))
    except Refused:
        raise
    except EpcError as e:      # collected with the other refusals (no catch-all: main's rule)
        raise ctx.fail(node, str(e)) from None
    ys = y if isinstance(y, tuple) else (y,)
    for o, v in zip(node.output, ys):
        if o:
            ctx.values[o] = v
            _cross_check(ctx, node, o, v)


def _cross_check(ctx, node, name: str, y: Value):
    dims = ctx.inferred_full.get(name)
    if not dims:
        return
    mine = y.shape
    theirs = dims[1:]
    if len(theirs) != len(mine) or any(t is not None and t != m for t, m in zip(theirs, mine)):
        raise ctx.fail(node, f"per-sample shape {list(mine)} computed by epc disagrees with "
                             f"ONNX shape inference {['?' if t is None else t for t in theirs]}")


__all__ = ["load_onnx", "survey_onnx", "SUPPORTED_OPS", "MIN_OPSET", "MAX_OPSET"]
