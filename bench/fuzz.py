"""Fuzzing epc's inputs: every bad input ends in one of three classes, within a memory budget.

    python -m bench.fuzz                      # the CI-sized run (tests/test_fuzz.py)
    python -m bench.fuzz --cases 20000        # a longer run, spread over the classes
    python -m bench.fuzz --only bundle --cases 5000 --seed 3 --json out.json

Each case mutates a real input (the repository's example ONNX files and a hand-built one
with BatchNorm, residual and constant-folded reshapes; IR texts of compiled examples and of
the pass tests; a trained checkpoint bundle; binary and assembly programs; small idx and
CIFAR data directories; command lines with odd option values), hands it to the same entry
point the CLI uses, in this process, and classifies what happens:

* accepted: the call returned;
* refused: an EpcError, which the CLI prints as one `epc: error:` line, exit status 2; its
  message must be one line and name the input (its file, or the flag);
* internal: any other exception (a bug: the CLI's exit status 1).

A case fails on an internal error, on a refusal that is not one line naming its input,
on a numpy warning (it would print before the error line), on an input accepted that
must not be (a mutation known to corrupt: a duplicate zip member, an unknown IR attribute,
a NaN Gemm alpha, more labels than images, an option value outside its rule, ...) or
accepted with a different meaning than it claims (a bundle or binary program whose bytes
changed but whose checksummed content must not have; IR text that does not print back to
the same graph), and when the process's peak memory grows past the budget (run under
EPC_MEMORY_LIMIT=256M, so every declared-size check must hold at a quarter of the default).

Every case is reproducible from (class, seed, index): the report names them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import resource
import shutil
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CLASSES = ("ir", "bundle", "program", "onnx", "data", "options")
# cases of the CI run (tests/test_fuzz.py), per class: ~2,900 in all
CI_CASES = {"ir": 900, "bundle": 500, "program": 450, "onnx": 300, "data": 250,
            "options": 500}
MEMORY_LIMIT = "256M"           # EPC_MEMORY_LIMIT for the run
BUDGET_MB = 640                 # peak RSS growth over the run's start allowed


# =========================================================================== outcomes
@dataclass
class Result:
    cls: str
    index: int
    mutation: str
    outcome: str                 # accepted | refused | internal
    message: str = ""
    failure: str = ""            # why the case fails ("" when it passes)


@dataclass
class Case:
    mutation: str
    run: Callable[[], Any]                       # the call under test
    names: tuple[str, ...] = ()                  # what a refusal must name (any of them)
    expect: str = "any"                          # any | refuse | accept
    check: Callable[[Any], str] | None = None    # for an accepted case: "" or what is wrong


def _classify(case: Case) -> tuple[str, Any, str, list]:
    from epc.compiler.errors import EpcError
    unraisable = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        return _classify_under(case, EpcError, unraisable)
    finally:
        sys.unraisablehook = hook


def _classify_under(case: Case, EpcError, unraisable: list) -> tuple[str, Any, str, list]:
    """(outcome, value, message, warnings): an exception Python could not raise (it would
    print "Exception ignored in ..." or a SystemError) counts as a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            value = case.run()
            result = "accepted", value, ""
        except EpcError as e:
            result = "refused", None, str(e)
        except (Exception, RecursionError) as e:        # noqa: BLE001 - what we look for
            tb = traceback.extract_tb(e.__traceback__)
            where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb)
                          if "/epc/" in f.filename or str(ROOT) in f.filename), "?")
            result = "internal", None, f"{type(e).__name__}: {str(e)[:200]} (at {where})"
    for u in unraisable:
        caught.append(warnings.WarningMessage(f"{type(u.exc_value).__name__}: {u.exc_value}",
                                              RuntimeWarning, "<unraisable>", 0))
    return (*result, caught)


def _judge(case: Case, outcome: str, value: Any, message: str, caught: list) -> str:
    noisy = [w for w in caught if not issubclass(w.category, (DeprecationWarning,
                                                               PendingDeprecationWarning,
                                                               FutureWarning))]
    if noisy:
        return f"a warning would print: {noisy[0].category.__name__}: {noisy[0].message}"
    if outcome == "internal":
        return "internal error: " + message
    if outcome == "refused":
        if case.expect == "accept":
            return f"refused, must be accepted: {message[:200]}"
        if not message.strip() or "\n" in message or "\r" in message:
            return f"refusal is not one line: {message[:200]!r}"
        if case.names and not any(n in message for n in case.names):
            return f"refusal does not name {case.names[0]!r}: {message[:200]}"
        return ""
    if case.expect == "refuse":
        return "accepted, must be refused"
    if case.check is not None:
        try:
            why = case.check(value)
        except Exception as e:        # noqa: BLE001 - reading back what was accepted failed
            why = f"reading it back fails: {type(e).__name__}: {str(e)[:200]}"
        if why:
            return "accepted, but " + why
    return ""


# =========================================================================== mutators
SPECIAL_NUMBERS = ["0", "-1", "1", "-0", "2", "3", "nan", "inf", "-inf", "1e999", "-1e999",
                   "1e-320", "4.9e-324", "1e38", "3.5e38", "2147483648", "4294967296",
                   "9223372036854775807", "9223372036854775808", "-9223372036854775809",
                   "18446744073709551616", "9" * 25, "9" * 5000, "0.5", "-0.5", "65536",
                   "268435456", "1e308", "00", "+5", "1_000"]


def flip_bits(rng: random.Random, data: bytes, n: int = 1) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def byte_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    k = rng.randrange(7)
    n = len(data)
    if k == 0:
        return "bit flip", flip_bits(rng, data, 1)
    if k == 1:
        return "bit flips", flip_bits(rng, data, rng.randint(2, 16))
    if k == 2:
        i = rng.randrange(n)
        return "byte set", data[:i] + bytes([rng.choice([0, 0xFF, 0x7F, 0x80])]) + data[i + 1:]
    if k == 3:
        return "truncate", data[:rng.randrange(n)]
    if k == 4:
        i, j = sorted(rng.randrange(n) for _ in range(2))
        return "delete span", data[:i] + data[j:]
    if k == 5:
        i = rng.randrange(n)
        return "insert bytes", data[:i] + bytes(rng.randrange(256) for _ in range(
            rng.randint(1, 16))) + data[i:]
    i, j = sorted(rng.randrange(n) for _ in range(2))
    return "duplicate span", data[:j] + data[i:j] + data[j:]


_TOKEN = re.compile(r"-?\d+(\.\d*)?([eE][-+]?\d+)?|[A-Za-z_][A-Za-z0-9_.]*|\"[^\"\n]*\"|\S")


def text_mutation(rng: random.Random, text: str) -> tuple[str, str]:
    """A token- or line-level edit of a text format."""
    lines = text.split("\n")
    k = rng.randrange(10)
    toks = list(_TOKEN.finditer(text))
    if k == 0 and toks:
        nums = [m for m in toks if re.fullmatch(r"-?\d.*", m.group())] or toks
        m = rng.choice(nums)
        return "number", text[:m.start()] + rng.choice(SPECIAL_NUMBERS) + text[m.end():]
    if k == 1 and toks:
        names = [m for m in toks if re.fullmatch(r"[A-Za-z_].*", m.group())] or toks
        m, other = rng.choice(names), rng.choice(names)
        return "name swap", text[:m.start()] + other.group() + text[m.end():]
    if k == 2:
        i = rng.randrange(len(lines))
        return "delete line", "\n".join(lines[:i] + lines[i + 1:])
    if k == 3:
        i = rng.randrange(len(lines))
        return "duplicate line", "\n".join(lines[:i + 1] + lines[i:])
    if k == 4:
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        return "swap lines", "\n".join(lines)
    if k == 5:
        return "truncate", text[:rng.randrange(len(text))]
    if k == 6 and toks:
        m = rng.choice(toks)
        junk = rng.choice(["[" * 5000 + "]" * 5000, "[" * 40, '"\\x41"', '"\\ud800"', "@",
                           "(", "->", "#", "\x00", "\u00e9", "{", "}", "=", ",", "''"])
        return "insert junk", text[:m.start()] + junk + text[m.start():]
    if k == 7 and toks:
        m = rng.choice(toks)
        return "delete token", text[:m.start()] + text[m.end():]
    if k == 8:
        i = rng.randrange(len(text))
        return "char", text[:i] + chr(rng.choice([0x20, 0x5B, 0x5D, 0x2C, 0x3D, 0x3A,
                                                   0x40, 0x22, 0x0A, 0x2D, 0x2E])) + text[i:]
    data = text.encode("utf-8")
    return "bit flip", flip_bits(rng, data).decode("utf-8", "replace")


def _write(directory: Path, name: str, data: bytes | str) -> str:
    p = directory / name
    p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return str(p)


# =========================================================================== seeds
def _onnx_seed_model():
    """A small model like a torch export: Conv + BatchNorm + ReLU, a residual Add, MaxPool,
    a constant-folded Shape/Gather/Concat reshape to [N, -1], Gemm (alpha, beta), a Div by a
    per-channel constant, Clip."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    r = np.random.default_rng(0)

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr), name)
    inits = [
        init("c1.w", r.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32)),
        init("c1.b", r.normal(0, 0.1, 4).astype(np.float32)),
        init("bn.s", r.uniform(0.5, 1.5, 4).astype(np.float32)),
        init("bn.b", r.normal(0, 0.1, 4).astype(np.float32)),
        init("bn.m", r.normal(0, 0.1, 4).astype(np.float32)),
        init("bn.v", r.uniform(0.5, 1.5, 4).astype(np.float32)),
        init("c2.w", r.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)),
        init("div", np.array([2.0, 4.0, 0.5, 1.0], np.float32).reshape(1, 4, 1, 1)),
        init("fc.w", r.normal(0, 0.2, (10, 64)).astype(np.float32)),
        init("fc.b", r.normal(0, 0.1, 10).astype(np.float32)),
        init("zero", np.array([0], np.int64)), init("minus1", np.array([-1], np.int64)),
        init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32)),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "c1.w", "c1.b"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["a", "bn.s", "bn.b", "bn.m", "bn.v"], ["b"], name="bn1",
          epsilon=1e-5),
        n("Relu", ["b"], ["c"], name="relu1"),
        n("Conv", ["c", "c2.w"], ["d"], name="conv2", pads=[1, 1, 1, 1], strides=[1, 1]),
        n("Add", ["c", "d"], ["e"], name="add1"),
        n("Div", ["e", "div"], ["e2"], name="div1"),
        n("Clip", ["e2", "lo", "hi"], ["f"], name="clip1"),
        n("MaxPool", ["f"], ["g"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        n("Shape", ["g"], ["gs"], name="shape1"),
        n("Gather", ["gs", "zero"], ["g0"], name="gather1", axis=0),
        n("Concat", ["g0", "minus1"], ["tgt"], name="concat1", axis=0),
        n("Reshape", ["g", "tgt"], ["h"], name="reshape1"),
        n("Gemm", ["h", "fc.w", "fc.b"], ["y"], name="fc", transB=1, alpha=1.0, beta=1.0),
    ]
    g = helper.make_graph(nodes, "fuzzseed",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


@dataclass
class Seeds:
    dir: Path
    ir: dict[str, str] = field(default_factory=dict)           # name -> text
    bundles: dict[str, bytes] = field(default_factory=dict)
    programs: dict[str, bytes] = field(default_factory=dict)   # name (with suffix) -> bytes
    onnx: dict[str, Any] = field(default_factory=dict)         # name -> ModelProto
    data: dict[str, dict[str, bytes]] = field(default_factory=dict)   # kind -> files
    model_path: str = ""                                       # a bundle for options


def make_seeds(directory: Path) -> Seeds:
    """Real inputs for every class, made by epc itself from the repository's examples."""
    import numpy as np
    import onnx

    import epc
    from epc.compiler.text import print_graph
    from epc.runtime import zoo
    from epc.targets.torch import emit
    s = Seeds(directory)
    d = directory / "seeds"
    d.mkdir(parents=True, exist_ok=True)
    # ONNX: two exported examples and the hand-built one
    for name in ("mlp_digits", "conv1_digits"):
        s.onnx[name] = onnx.load(str(EXAMPLES / f"{name}.onnx"))
    s.onnx["fuzzseed"] = _onnx_seed_model()
    onnx.save(s.onnx["fuzzseed"], str(d / "fuzzseed.onnx"))
    # IR texts: compiled examples (feedforward and energy forms, weights inline or seeded)
    # and every pass test file
    conv = epc.compile(str(d / "fuzzseed.onnx"))
    s.ir["fuzzseed_energy"] = print_graph(conv, weights="inline")
    small = zoo.mlp((6, 5, 3), name="small")
    s.ir["small_energy"] = print_graph(small, weights="inline")
    from epc.sources import load_source
    ff = load_source(str(d / "fuzzseed.onnx")).graph
    s.ir["fuzzseed_ff"] = print_graph(ff, weights="inline")
    for p in sorted((ROOT / "tests" / "passes").glob("*.epir")):
        s.ir[p.stem] = p.read_text()
    # bundles: a torch bundle and a checkpoint (optimiser state, history)
    mlp = zoo.mlp((64, 12, 10), name="mlp", max_sweeps=20, nudge_sweeps=8)
    emit(mlp, d / "mlp.epc", None)
    s.bundles["mlp.epc"] = (d / "mlp.epc").read_bytes()
    s.model_path = str(d / "mlp.epc")
    epc.train(str(d / "mlp.epc"), epochs=1, batch_size=128, checkpoint=str(d / "ck"),
              threads=1)
    s.bundles["ck.epc"] = (d / "ck" / "last.epc").read_bytes()
    conv_b = d / "conv.epc"
    epc.compile(str(d / "fuzzseed.onnx"), target="torch", output=str(conv_b))
    s.bundles["conv.epc"] = conv_b.read_bytes()
    # programs: binary and assembly of a small MLP and the conv net
    for name, src in (("mlp", d / "mlp.epc"), ("conv", conv_b)):
        for suffix in (".nc", ".nca"):
            out = d / f"{name}{suffix}"
            epc.compile(str(src), target="neuromorphic", output=str(out))
            s.programs[name + suffix] = out.read_bytes()
    # and the MLP with bernoulli neurons: spike generators, traces, time-step phases
    for suffix in (".nc", ".nca"):
        out = d / f"smlp{suffix}"
        epc.compile(str(d / "mlp.epc"), target="neuromorphic", output=str(out),
                    neuron="bernoulli", time_steps=8, nudge_time_steps=4)
        s.programs["smlp" + suffix] = out.read_bytes()
    # data: idx (MNIST layout) and CIFAR-10 binary / python batches, a few samples each
    rng = np.random.default_rng(0)

    def idx(arr: np.ndarray) -> bytes:
        head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big")
                                                     for n in arr.shape)
        return head + arr.astype(np.uint8).tobytes()
    s.data["mnist"] = {
        "train-images-idx3-ubyte": idx(rng.integers(0, 256, (12, 28, 28))),
        "train-labels-idx1-ubyte": idx(rng.integers(0, 10, 12)),
        "t10k-images-idx3-ubyte": idx(rng.integers(0, 256, (6, 28, 28))),
        "t10k-labels-idx1-ubyte": idx(rng.integers(0, 10, 6))}

    def cifar_bin(n: int) -> bytes:
        recs = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1)
        return recs.astype(np.uint8).tobytes()
    s.data["cifar-bin"] = {f"data_batch_{i}.bin": cifar_bin(3) for i in range(1, 6)}
    s.data["cifar-bin"]["test_batch.bin"] = cifar_bin(4)
    import pickle

    def cifar_py(n: int) -> bytes:
        return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                             b"labels": [int(v) for v in rng.integers(0, 10, n)]}, protocol=3)
    s.data["cifar-py"] = {f"data_batch_{i}": cifar_py(3) for i in range(1, 6)}
    s.data["cifar-py"]["test_batch"] = cifar_py(4)
    return s


# =========================================================================== IR text
def _code_matches(pattern: str, text: str) -> list:
    """Matches of `pattern` outside `#` comment lines."""
    out = []
    for m in re.finditer(pattern, text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        if not text[line_start:m.start()].lstrip().startswith("#"):
            out.append(m)
    return out


def ir_cases(seeds: Seeds, rng: random.Random, work: Path):
    from epc import api
    from epc.compiler.text import parse, print_graph
    names = sorted(seeds.ir)
    while True:
        name = rng.choice(names)
        text = seeds.ir[name]
        k = rng.randrange(10)
        expect = "any"
        if k == 0:       # an attribute key the reader does not know: never ignored
            keys = _code_matches(r"([\[,] *)([a-z_]+)=", text)
            if not keys:
                continue
            m = rng.choice(keys)
            new = rng.choice([m.group(2) + "_", m.group(2)[:-1] or "x", "b" + m.group(2)])
            mutation, text = "unknown attribute", text[:m.start(2)] + new + text[m.end(2):]
            expect = "refuse"
        elif k == 1:     # an attribute given twice
            keys = _code_matches(r"([\[,] *)([a-z_]+=[^,\]\n(]+)(?=[,\]])", text)
            if not keys:
                continue
            m = rng.choice(keys)
            mutation = "duplicate attribute"
            text = text[:m.end(2)] + ", " + m.group(2) + text[m.end(2):]
            expect = "refuse"
        elif k == 2:     # a cost weight or temperature that is no number
            costs = _code_matches(r"(weight|temperature)=([-0-9.e]+)", text)
            if not costs:
                continue
            m = rng.choice(costs)
            mutation = "non-finite cost field"
            text = text[:m.start(2)] + rng.choice(["nan", "inf", "-inf", "1e999"]) + \
                text[m.end(2):]
            expect = "refuse"
        else:
            mutation, text = text_mutation(rng, text)
        path = _write(work, "g.epir", text)
        fmt = rng.choice(["text", "json", "dot"])

        def run(path=path, fmt=fmt):
            api.inspect(path, format=fmt, stats=fmt == "json")
            return api.inspect(path, format="text")

        def check(printed: str) -> str:
            # what was accepted prints back, inline, to a text that reads the same graph
            g = parse(printed)
            again = print_graph(parse(print_graph(g, weights="inline")), weights="inline")
            return "" if again == print_graph(g, weights="inline") else "it does not round-trip"
        yield f"{name}: {mutation}", Case(mutation, run, names=(path,), expect=expect,
                                          check=check)


# =========================================================================== bundles
def _content(path: str):
    """What a bundle means: graph text, weight bytes, target, meta, extra arrays, docs."""
    from epc.compiler.bundle import read_bundle
    from epc.compiler.text import print_graph
    b = read_bundle(path)
    return (print_graph(b.graph, weights="shapes"),
            {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in b.graph.weights.items()},
            b.target, json.dumps(b.meta, sort_keys=True),
            {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in b.arrays.items()},
            json.dumps(b.docs, sort_keys=True))


def _rezip(data: bytes, edit: Callable[[list], list], compression=zipfile.ZIP_STORED) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    items = edit(items)
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # zipfile warns about duplicate names
        with zipfile.ZipFile(out, "w", compression) as z:
            for name, body in items:
                z.writestr(name, body)
    return out.getvalue()


def _zip_bomb(data: bytes, size: int) -> bytes:
    """The bundle plus a deflated member of `size` zero bytes (written in chunks: the
    fuzzer itself never holds it)."""
    out = io.BytesIO(data)
    with zipfile.ZipFile(out, "a", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("extra/bomb.npy", "w", force_zip64=True) as f:
            chunk = b"\x00" * (1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
    return out.getvalue()


def _npy_header_edit(rng: random.Random, body: bytes) -> tuple[str, bytes]:
    """Rewrite a .npy member's header (dtype, order, shape), keeping its data."""
    import numpy as np
    f = io.BytesIO(body)
    np.lib.format.read_magic(f)
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    data = body[f.tell():]
    k = rng.randrange(6)
    if k == 0:
        others = [d for d in (">f4", "<c8", "|b1", "<m8[s]", "<i8", "<f2", "|O", "<U4",
                              "[('a', '<f4')]", "<f8", "<f4") if d != dtype.str]
        new = {"descr": rng.choice(others), "fortran_order": False, "shape": shape}
        what = f"dtype {new['descr']}"
    elif k == 1:
        new = {"descr": dtype.str, "fortran_order": True, "shape": shape}
        what = "fortran order"
    elif k == 2:
        new = {"descr": dtype.str, "fortran_order": False,
               "shape": (1 << 33,) + tuple(shape)[1:] if shape else (1 << 33,)}
        what = "shape of 32 GiB"
    elif k == 3:
        new = {"descr": dtype.str, "fortran_order": False, "shape": tuple(shape)[::-1] + (1,)}
        what = "other shape"
    elif k == 4:
        new = {"descr": dtype.str, "fortran_order": False, "shape": ()}
        what = "0-d shape"
    else:
        return "header text", body[:10] + rng.choice(
            [b"{'descr': '<f4', 'fortran_order': False, 'shape': (" + b"(" * 300 + b")",
             b"not a dict at all", b"{'descr': 1, 'fortran_order': 'x', 'shape': [1]}"]) + \
            body[10:].split(b"\n", 1)[-1]
    out = io.BytesIO()
    if new["descr"].startswith("["):
        new["descr"] = [("a", "<f4")]
    np.lib.format.write_array_header_1_0(out, new)
    return what, out.getvalue() + data


def bundle_cases(seeds: Seeds, rng: random.Random, work: Path):
    from epc import api
    from epc.runtime.api import make_engine
    names = sorted(seeds.bundles)
    originals = {}
    for n in names:
        p = _write(work, "orig-" + n, seeds.bundles[n])
        originals[n] = _content(p)
    bombs = {n: _zip_bomb(seeds.bundles[n], 160 << 20) for n in names}
    digits = {}

    def restore(eng, b, path):
        from epc.runtime.data import load_dataset
        from epc.runtime.train import Trainer, TrainConfig
        if "d" not in digits:
            digits["d"] = load_dataset("digits", input_shape=eng.input_shapes[eng.inputs[0]])
        Trainer(eng, digits["d"], TrainConfig(epochs=1, batch_size=128)).restore(b, path)
    while True:
        name = rng.choice(names)
        data = seeds.bundles[name]
        k = rng.randrange(12)
        expect, same = "any", True
        if k == 0:
            def dup(items):
                i = rng.randrange(len(items))
                return items + [items[i]]
            mutation, data, expect = "duplicate member", _rezip(data, dup), "refuse"
        elif k == 1:
            def rename(items):
                i = rng.randrange(len(items))
                n, b = items[i]
                items[i] = (rng.choice([n + "x", n.upper(), "weights/" + n, n.replace("/", "//"),
                                        "../" + n, n[:-1]]), b)
                return items
            mutation, data = "renamed member", _rezip(data, rename)
            same = False
        elif k == 2:
            def npy(items):
                cands = [i for i, (n, _) in enumerate(items) if n.endswith(".npy")]
                i = rng.choice(cands)
                what, body = _npy_header_edit(rng, items[i][1])
                npy.what = what
                items[i] = (items[i][0], body)
                return items
            data = _rezip(data, npy)
            mutation, expect = f"npy header: {npy.what}", "refuse"
        elif k == 3:
            def manifest(items):
                i = next(i for i, (n, _) in enumerate(items) if n == "manifest.json")
                m = json.loads(items[i][1])
                j = rng.randrange(5)
                if j == 0:
                    m["meta"] = rng.choice([[1, 2], "meta", 3, None, True])
                elif j == 1:
                    m["version"] = rng.choice([True, 0, -1, 1.0, "1", 2 ** 70])
                elif j == 2:
                    m["target"] = rng.choice([1, ["torch"], {"a": 1}])
                elif j == 3:
                    m["extra_key"] = 1
                else:
                    m = rng.choice([[m], "x", 1])
                items[i] = ("manifest.json", json.dumps(m).encode())
                return items
            data = _rezip(data, manifest)
            mutation = "manifest"
            if b'"meta": null' in data:      # a null meta is an empty one
                expect = "any"
            else:
                expect = "refuse"
        elif k == 4:
            def deep(items):
                doc = rng.choice([b"[" * 100000 + b"]" * 100000, b"1" * 5000, b"{\"a\":",
                                  b"\xff\xfe"])
                target = rng.choice([n for n, _ in items if n.endswith(".json")])
                return [(n, doc if n == target else b) for n, b in items]
            mutation, data, expect = "bad JSON member", _rezip(data, deep), "refuse"
        elif k == 5:
            # a zip bomb: 160 MB of zeros deflated to ~160 KB (made once): its 2 x 160 MB
            # estimate is over the run's 256M limit
            mutation, data, expect = "zip bomb", bombs[name], "refuse"
        elif k == 6:
            mutation, data = "deflated (same content)", _rezip(data, lambda it: it,
                                                               zipfile.ZIP_DEFLATED)
        elif k == 7:
            comp = rng.choice([zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
            mutation, data = f"compression {comp}", _rezip(data, lambda it: it, comp)
            expect = "refuse"
        elif k == 8:          # the encrypted flag on a member
            b = bytearray(data)
            for m in re.finditer(b"PK\x01\x02", bytes(b)):
                b[m.start() + 8] |= 1
            for m in re.finditer(b"PK\x03\x04", bytes(b)):
                b[m.start() + 6] |= 1
            mutation, data, expect = "encrypted", bytes(b), "refuse"
        elif k == 9:
            def nan(items):
                import numpy as np
                cands = [i for i, (n, _) in enumerate(items) if n.startswith("weights/")]
                i = rng.choice(cands)
                arr = np.load(io.BytesIO(items[i][1]))
                if arr.size == 0 or arr.dtype.kind != "f":
                    return items
                arr = arr.copy()
                arr.reshape(-1)[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf])
                buf = io.BytesIO()
                np.save(buf, arr)
                items[i] = (items[i][0], buf.getvalue())
                return items
            mutation, data, expect = "NaN weight", _rezip(data, nan), "refuse"
        else:
            mutation, data = byte_mutation(rng, data)
        path = _write(work, "b.epc", data)

        def run(path=path, name=name):
            api.inspect(path)
            eng, b, _ = make_engine(path)
            if name == "ck.epc":        # what --resume reads: the training state
                restore(eng, b, path)
            return path

        def check(path, name=name, same=same) -> str:
            if same and _content(path) != originals[name]:
                return "its content differs from the original"
            return ""
        yield f"{name}: {mutation}", Case(mutation, run, names=(path,), expect=expect,
                                          check=check)


# =========================================================================== programs
# values that corrupt a bernoulli program's spike generator (docs/isa.md, Spikes): a stuck
# or out-of-range xorshift32 seed, a trace decay out of range, no or negative time steps,
# a mean over more steps than run, an unknown noise source, an unbounded or
# out-of-scale firing probability, an unknown neuron model
SPIKE_CORRUPTIONS = [("spike_seed", "0"), ("spike_seed", "4294967296"), ("spike_seed", "-7"),
                     ("tau_shift", "13"), ("tau_shift", "-1"), ("sweeps", "0"),
                     ("sweeps", "-3"), ("mean", "0"), ("mean", "99999"), ("noise", "both"),
                     ("act", "relu"), ("act", "identity"), ("hi", "257"), ("lo", "-1"),
                     ("neuron", "poisson")]


def program_cases(seeds: Seeds, rng: random.Random, work: Path):
    from epc import api
    from epc.targets.neuromorphic.api import load_program
    from epc.targets.neuromorphic.assembler import disassemble
    names = sorted(seeds.programs)
    originals = {}
    for n in names:
        originals[n] = disassemble(load_program(_write(work, "orig-" + n, seeds.programs[n])))
    while True:
        name = rng.choice(names)
        data = seeds.programs[name]
        binary = name.endswith(".nc")
        expect = "any"
        if binary:
            mutation, data = byte_mutation(rng, data)
            if mutation != "truncate" or len(data) != len(seeds.programs[name]):
                expect = "refuse" if data != seeds.programs[name] else "any"
        else:
            text = data.decode()
            k = rng.randrange(8)
            if k == 0:      # a memory declared huge (the 450-byte program of issue 25)
                m = rng.choice(list(re.finditer(r"\.mem (\S+) (\S+) (\S+) \[([0-9,]+)\]", text)))
                dims = rng.choice(["65536,65536", "268435456", "16384,16384", "9" * 30,
                                   "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
                                   "4294967296,4294967296", "0", "-5"])
                mutation = "huge memory"
                text = text[:m.start(4)] + dims + text[m.end(4):]
                expect = "refuse"
            elif k == 1:    # an unknown field
                m = rng.choice(list(re.finditer(r" ([a-z_]+)=", text)))
                mutation = "unknown field"
                text = text[:m.start(1)] + m.group(1) + "x" + text[m.end(1):]
                expect = "refuse"
            elif k == 2:    # a word out of int64
                m = rng.choice(list(re.finditer(r"(?m)^  (-?\d+)", text)) or [None])
                if m is None:
                    continue
                mutation = "huge word"
                text = text[:m.start(1)] + rng.choice(["9" * 25, "-" + "9" * 30,
                                                       str(2 ** 63)]) + text[m.end(1):]
                expect = "refuse"
            elif k in (3, 4) and "neuron=bernoulli" in text:   # a corrupted spike generator
                field, bad = rng.choice(SPIKE_CORRUPTIONS)
                # group fields: on the bernoulli group's line
                line = r"(?m)^\.group [^\n]*neuron=bernoulli[^\n]*" if field in (
                    "act", "hi", "lo", "neuron") else r"(?m)^[^\n]*"
                spans = [(ln.start() + f.start(1), ln.start() + f.end(1))
                         for ln in re.finditer(line, text)
                         for f in re.finditer(rf" {field}=(-?\w+)", ln.group())]
                m = rng.choice(spans)
                mutation = f"spiking {field}={bad}"
                text = text[:m[0]] + bad + text[m[1]:]
                expect = "refuse"
            else:
                mutation, text = text_mutation(rng, text)
            data = text.encode("utf-8", "replace")
        path = _write(work, "p" + name[name.index("."):], data)

        def run(path=path):
            api.inspect(path)
            return path

        def check(path, name=name, binary=binary) -> str:
            got = disassemble(load_program(path))
            if binary and got != originals[name]:
                return "the checksummed program changed meaning"
            from epc.targets.neuromorphic.assembler import assemble
            if disassemble(assemble(got)) != got:
                return "its assembly does not round-trip"
            return ""
        yield f"{name}: {mutation}", Case(mutation, run, names=(path,), expect=expect,
                                          check=check)


# =========================================================================== ONNX
def _onnx_mutation(rng: random.Random, m):
    """A structure-aware edit of a ModelProto; returns (what, expect)."""
    import numpy as np
    from onnx import helper, numpy_helper
    g = m.graph
    nodes = list(g.node)
    k = rng.randrange(14)
    if k == 0:
        gemms = [n for n in nodes if n.op_type == "Gemm"]
        if gemms:
            n = rng.choice(gemms)
            for a in list(n.attribute):
                if a.name in ("alpha", "beta"):
                    n.attribute.remove(a)
            n.attribute.append(helper.make_attribute(rng.choice(["alpha", "beta"]),
                                                     rng.choice([float("nan"), float("inf"),
                                                                 -float("inf")])))
            return "non-finite Gemm alpha/beta", "refuse"
    if k == 1:
        bns = [n for n in nodes if n.op_type == "BatchNormalization"]
        if bns:
            var = {t.name: t for t in g.initializer}[bns[0].input[4]]
            arr = numpy_helper.to_array(var).copy()
            arr[rng.randrange(arr.size)] = rng.choice([-1.0, -1e-3, -2.0])
            var.CopyFrom(numpy_helper.from_array(arr, var.name))
            return "negative BatchNorm variance", "refuse"
    if k == 2:
        divs = [n for n in nodes if n.op_type == "Div"]
        if divs:
            t = {t.name: t for t in g.initializer}[divs[0].input[1]]
            arr = numpy_helper.to_array(t).copy()
            # 1 / x is past float32's 3.4e38 (or x is 0)
            arr.reshape(-1)[rng.randrange(arr.size)] = rng.choice([1e-40, 1e-45, 2e-39, 0.0])
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
            return "division by a denormal or zero", "refuse"
    if k == 3:
        convs = [n for n in nodes if n.op_type in ("Conv", "MaxPool")]
        if convs:
            n = rng.choice(convs)
            if not any(a.name == "pads" for a in n.attribute):
                n.attribute.append(helper.make_attribute("pads", [0, 0, 0, 0]))
            n.attribute.append(helper.make_attribute("auto_pad", rng.choice(
                ["SAME_UPPER", "SAME_LOWER", "VALID"])))
            return "auto_pad and pads", "refuse"
    if k == 4 and len(nodes) > 1:
        a, b = rng.sample(nodes, 2)
        a.name = b.name = rng.choice(["n", b.name or "n"])
        return "duplicate node names", "refuse"
    if k == 5:            # an unused huge constant: a dead branch, must cost nothing
        shape = numpy_helper.from_array(np.array([1 << 28], np.int64), "dead_shape")
        g.initializer.append(shape)
        g.node.append(helper.make_node("ConstantOfShape", ["dead_shape"], ["dead"], name="dead"))
        return "dead ConstantOfShape of 2^28 floats", "any"
    if k == 6:            # a live huge constant: bounded before it is made
        shape = numpy_helper.from_array(np.array(rng.choice([[1 << 28], [1 << 14, 1 << 14],
                                                              [1 << 40]]), np.int64), "big_shape")
        g.initializer.append(shape)
        out = g.output[0].name
        prod = next(n for n in nodes if out in n.output)
        prod.output[list(prod.output).index(out)] = "pre_out"
        g.node.extend([helper.make_node("ConstantOfShape", ["big_shape"], ["big"], name="big"),
                       helper.make_node("Add", ["pre_out", "big"], [out], name="addbig")])
        return "live huge ConstantOfShape", "refuse"
    if k == 7:
        t = rng.choice(list(g.initializer))
        arr = numpy_helper.to_array(t)
        if arr.dtype.kind == "f" and arr.size:
            kind = rng.randrange(3)
            if kind == 0:
                new = arr.astype(np.complex64)
            elif kind == 1:
                new = arr.astype(np.float64) * rng.choice([1e30, -1e30, 1e300])
            else:
                new = arr.copy()
                new.reshape(-1)[0] = np.nan
            t.CopyFrom(numpy_helper.from_array(new, t.name))
            return "initializer dtype/values", "refuse" if kind != 1 else "any"
    if k in (8, 9, 10) and nodes:
        n = rng.choice(nodes)
        if n.attribute:
            a = rng.choice(list(n.attribute))
            if a.type == 2:       # INT
                a.i = rng.choice([0, -1, 2, 3, 1 << 31, -(1 << 40), 7])
            elif a.type == 7:     # INTS
                vals = list(a.ints)
                if vals:
                    vals[rng.randrange(len(vals))] = rng.choice([0, -1, 2, 5, 1 << 31, -3, 100])
                    if rng.random() < 0.3:
                        vals = vals + [1]
                del a.ints[:]
                a.ints.extend(vals)
            elif a.type == 1:     # FLOAT
                a.f = rng.choice([0.0, -1.0, 1e-45, 1e38, float("nan"), 2.0])
            elif a.type == 3:     # STRING
                a.s = rng.choice([b"SAME_UPPER", b"VALID", b"NOTSET", b"bogus", b""])
            return f"attribute {n.op_type}.{a.name}", "any"
    if k == 11 and nodes:
        n = rng.choice(nodes)
        n.op_type = rng.choice(["Relu", "Sigmoid", "Identity", "Add", "Mul", "MatMul",
                                "Transpose", "Softmax", "Conv", "Gemm", "Flatten"])
        return "op type", "any"
    if k == 12 and nodes:
        n = rng.choice(nodes)
        if n.input:
            i = rng.randrange(len(n.input))
            pool = [x for nn in nodes for x in nn.output] + [t.name for t in g.initializer] + \
                [g.input[0].name, "", "missing"]
            n.input[i] = rng.choice(pool)
            return "rewired input", "any"
    if k == 13:
        t = rng.choice(list(g.initializer))
        dims = list(t.dims)
        if dims:
            dims[rng.randrange(len(dims))] = rng.choice([0, 1, 1 << 33, 3])
            del t.dims[:]
            t.dims.extend(dims)
            return "initializer dims", "any"
    t = g.input[0].type.tensor_type.shape.dim
    d = t[rng.randrange(1, len(t))] if len(t) > 1 else t[0]
    d.dim_value = rng.choice([1, 3, 0, 1 << 20, 9])
    return "input shape", "any"


def onnx_cases(seeds: Seeds, rng: random.Random, work: Path):
    import onnx

    from epc import api
    names = sorted(seeds.onnx)
    while True:
        name = rng.choice(names)
        m = onnx.ModelProto()
        m.CopyFrom(seeds.onnx[name])
        if rng.random() < 0.15:
            mutation, expect = "bytes", "any"
            buf = m.SerializeToString()
            mutation, buf = byte_mutation(rng, buf)
        else:
            try:        # (an edit of an edit may not apply: a new case is drawn)
                mutation, expect = _onnx_mutation(rng, m)
                if rng.random() < 0.25:
                    _onnx_mutation(rng, m)
                    mutation += " (+1 more)"
                    expect = "any"
            except (ValueError, IndexError, KeyError, StopIteration):
                continue
            buf = m.SerializeToString()
        path = _write(work, "m.onnx", buf)
        # accepted models are checked against onnxruntime (--verify), a third of them
        verify = rng.random() < 0.35

        def run(path=path, verify=verify):
            return api.compile_result(path, verify=verify)
        yield f"{name}: {mutation}", Case(mutation, run, names=(path,), expect=expect)


# =========================================================================== data
def data_cases(seeds: Seeds, rng: random.Random, work: Path):
    import numpy as np

    from epc.runtime.data import load_dataset
    kinds = sorted(seeds.data)
    while True:
        kind = rng.choice(kinds)
        files = dict(seeds.data[kind])
        target = rng.choice(sorted(files))
        body = files[target]
        expect = "any"
        k = rng.randrange(8)
        if kind == "mnist" and k == 0:      # more (or fewer) labels than images
            head, lab = body[:8], body[8:]
            if "labels" not in target:
                continue
            n = int.from_bytes(head[4:8], "big") + rng.choice([1, -1, 5])
            extra = bytes(rng.randrange(10) for _ in range(max(n - len(lab), 0)))
            files[target] = head[:4] + n.to_bytes(4, "big") + (lab + extra)[:n]
            mutation, expect = "label count", "refuse"
        elif kind == "mnist" and k == 1:    # header dims that overflow
            nd = body[3]
            dims = b"".join(rng.choice([b"\xff\xff\xff\xff", b"\x80\x00\x00\x00",
                                        b"\x00\x00\x00\x00"]) for _ in range(nd))
            files[target] = body[:4] + dims + body[4 + 4 * nd:]
            mutation, expect = "header dims", "refuse"
        elif kind == "mnist" and k == 2:    # a label file of another element type
            files[target] = body[:2] + bytes([rng.choice([0x09, 0x0B, 0x0C, 0x0D, 0x0E])]) + \
                body[3:]
            mutation, expect = "idx element type", "refuse"
        elif kind == "cifar-py" and k in (0, 1):
            import pickle
            d = pickle.loads(body)
            if k == 0:
                d[b"labels"] = rng.choice([["a"] * len(d[b"labels"]), d[b"labels"][:-1],
                                           d[b"labels"] + [1], [1.5] * len(d[b"labels"]),
                                           [-1] * len(d[b"labels"]), "abc"])
                mutation = "labels"
            else:
                d[b"data"] = rng.choice([d[b"data"][:, :100], d[b"data"].astype(np.float32),
                                         d[b"data"][:0]])
                mutation = "data array"
            files[target] = pickle.dumps(d, protocol=3)
            expect = "refuse"
        elif kind == "cifar-bin" and k == 0:
            files[target] = body[:-rng.randint(1, 3000)]
            mutation, expect = "partial record", "refuse"
        elif k == 3:
            import gzip
            files[target + ".gz"] = gzip.compress(body)
            del files[target]
            mutation = "gzipped"
        else:
            mutation, files[target] = byte_mutation(rng, body)
        d = work / "data"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        for fn, b in files.items():
            (d / fn).write_bytes(b)
        name = "mnist" if kind == "mnist" else "cifar10"
        shape = (784,) if name == "mnist" else (3, 32, 32)

        def run(d=d, name=name, shape=shape):
            return load_dataset(name, data_dir=str(d), input_shape=shape, num_classes=10)

        def check(data) -> str:
            for split in (data.train, data.test):
                if len(split.x) != len(split.y) or len(split.y) == 0:
                    return "images and labels do not pair up"
                if int(split.y.min()) < 0 or int(split.y.max()) >= 10:
                    return "labels out of range"
            return ""
        yield f"{kind}/{target}: {mutation}", Case(mutation, run, names=(str(d), name),
                                                   expect=expect, check=check)


# =========================================================================== options
def _int(lo, hi):
    """An integer option: what typer reads as an integer (Python's int() of ASCII text, or
    a float text with a zero fraction such as '1.0'), in range."""
    def ok(v: str) -> bool:
        if not v.isascii():
            return False
        try:
            n = int(v)
        except ValueError:          # not an integer, or more digits than Python converts
            if not re.fullmatch(r"\s*[-+]?\d+\.0+\s*", v) or len(v) > 4300:
                return False
            n = int(float(v))
        return lo <= n <= hi
    return ok


def _real(pred):
    def ok(v: str) -> bool:
        try:
            x = float(v)
        except ValueError:
            return False
        import math
        return math.isfinite(x) and pred(x)
    return ok


def _one_of(*vals):
    return lambda v: v in vals


def _size(v: str) -> bool:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", v)
    if not m or len(m.group(1)) > 15:
        return False
    n = float(m.group(1)) * {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30,
                             "t": 2 ** 40}[m.group(2).lower()]
    return 1 <= int(n) <= 2 ** 50


def _resize(v: str) -> bool:
    v = v.strip().lower()
    return re.fullmatch(r"\d{1,6}(x\d{1,6})?", v) is not None and \
        all(1 <= int(p) <= 1 << 14 for p in v.split("x"))


# the rule of each option, written out here independently of compiler/flags.py
OPTION_RULES = {
    "--epochs": _int(0, 10 ** 6), "--batch-size": _int(1, 1 << 24),
    "--max-sweeps": _int(1, 10 ** 6), "--nudge-sweeps": _int(1, 10 ** 6),
    "--samples": _int(1, 1 << 24), "--limit": _int(1, 2 ** 31 - 1),
    "--stop-after": _int(1, 10 ** 6), "--seed": _int(0, 2 ** 32 - 1),
    "--threads": _int(1, 1024), "--channels": _int(1, 4096), "--lr-shift": _int(0, 48),
    "--tol": _real(lambda x: x >= 0), "--lr": _real(lambda x: x > 0),
    "--momentum": _real(lambda x: 0 <= x < 1), "--weight-decay": _real(lambda x: x >= 0),
    "--clip": _real(lambda x: x > 0), "--beta": _real(lambda x: x != 0),
    "--device": _one_of("cpu"),          # cuda and mps: refused where absent (this machine)
    "--schedule": _one_of("colour", "color", "sync"), "--split": _one_of("test", "train"),
    "--dtype": _one_of("float64", "float32"), "--nudge": _one_of("symmetric", "one-sided"),
    "--gradient": _one_of("ep", "implicit"), "--optimizer": _one_of("adam", "sgd"),
    "--divergence": _one_of("stop", "warn"), "--memory-limit": _size, "--resize": _resize,
    "--data": _one_of("digits", "mnist", "fashion-mnist", "cifar10", "cifar100"),
    "--tap-weight": _real(lambda x: x > 0), "--temperature": _real(lambda x: x > 0),
    "--mix": _real(lambda x: 0 <= x <= 1), "--skip-gain": _real(lambda x: x > 0),
    "--dist-timeout": _real(lambda x: 0 < x <= 10 ** 6),
    "--precision": _one_of("fp32", "bf16", "fp16"),
    # bernoulli (StochEP) neurons
    "--time-steps": _int(1, 10 ** 6), "--nudge-time-steps": _int(1, 10 ** 6),
    "--averaging": lambda v: re.fullmatch(r"(trace|window)(:\d{1,7})?", v) is not None
    and 1 <= int(v.partition(":")[2] or 8) <= 10 ** 6,
    "--sampling": _one_of("shared", "independent"), "--estimate": _one_of("rates", "spikes"),
    "--seeds": _int(1, 10 ** 5),
    # backprop (warm conversion) and the compiler's numeric choices
    "--activations": _one_of("energy", "source"), "--loss": _one_of("graph", "ce", "mse"),
    "--feedback-gain": lambda v: v == "auto" or _real(lambda x: 0 < x <= 1)(v),
    "--backprop-epochs": lambda v: v == "auto" or _int(0, 10 ** 6)(v),
    "--backprop-lr": _real(lambda x: x > 0),
}
COMMAND_OPTIONS = {
    "train": ["--epochs", "--batch-size", "--max-sweeps", "--nudge-sweeps", "--stop-after",
              "--seed", "--threads", "--channels", "--tol", "--lr", "--momentum",
              "--weight-decay", "--clip", "--beta", "--device", "--schedule", "--nudge",
              "--gradient", "--optimizer", "--divergence", "--memory-limit", "--resize",
              "--data", "--dist-timeout", "--precision", "--estimate", "--backprop-epochs",
              "--backprop-lr"],
    "eval": ["--batch-size", "--max-sweeps", "--threads", "--channels", "--tol", "--device",
             "--schedule", "--split", "--memory-limit", "--resize", "--data", "--precision"],
    "check-gradients": ["--samples", "--max-sweeps", "--seed", "--threads", "--channels",
                        "--tol", "--beta", "--device", "--schedule", "--dtype", "--nudge",
                        "--memory-limit", "--resize", "--data", "--seeds", "--estimate"],
    "run": ["--batch-size", "--limit", "--memory-limit", "--resize", "--data"],
    "compile": ["--max-sweeps", "--nudge-sweeps", "--tol", "--schedule", "--tap-weight",
                "--temperature", "--mix", "--skip-gain", "--memory-limit", "--time-steps",
                "--nudge-time-steps", "--averaging", "--sampling", "--feedback-gain"],
    "backprop": ["--epochs", "--batch-size", "--lr", "--weight-decay", "--activations",
                 "--loss", "--seed", "--device", "--threads", "--memory-limit", "--resize",
                 "--data", "--channels"],
}
OPTION_VALUES = SPECIAL_NUMBERS + ["", " ", "abc", "0x10", "1.5", "1e3", "5e-4", "0.9",
                                   "0.999999", "1.0", "meta", "cpu", "cuda", "cuda:0", "mps",
                                   "cpu:0", "colour", "color", "sync", "test", "train",
                                   "float32", "float64", "float16", "fp32", "bf16", "fp16", "symmetric", "one-sided",
                                   "ep", "implicit", "adam", "sgd", "stop", "warn", "256M",
                                   "1G", "1.5g", "0M", "1T", "2P", "32x32", "0x5", "8x8x8",
                                   "digits", "mnist", "imagenet", "-5", "1024", "1025", "48",
                                   "49", "4096", "4097", "16384", "16385", "trace", "trace:8",
                                   "window:0", "window:1000001", "shared", "independent",
                                   "rates", "spikes", "energy", "source", "graph", "ce",
                                   "mse", "auto", "0.1", "4", "3", "12", "13"]


def options_cases(seeds: Seeds, rng: random.Random, work: Path):
    import torch

    from epc.cli import main
    from epc.compiler.errors import EpcError
    missing = str(work / "no-such-model.epc")       # every valid command line ends here
    commands = sorted(COMMAND_OPTIONS)
    while True:
        cmd = rng.choice(commands)
        flag = rng.choice(COMMAND_OPTIONS[cmd])
        value = rng.choice(OPTION_VALUES)
        if rng.random() < 0.1:
            value = str(rng.randint(-(2 ** 70), 2 ** 70))
        elif rng.random() < 0.1:
            value = repr(rng.uniform(-10, 10))
        args = [cmd, missing, f"{flag}={value}"]
        valid = OPTION_RULES[flag](value)

        def run(args=args):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    code = main(args)
            finally:
                torch.set_num_threads(1)         # a valid --threads changes the process
            lines = err.getvalue().strip().splitlines()
            if len(lines) != 1 or code != 2 or not lines[0].startswith("epc: error: "):
                raise AssertionError(f"not one error line and status 2: {code} {lines[:3]}")
            line = lines[0][len("epc: error: "):]
            if line == f"{missing}: no such file":
                return line                      # every option passed: the model is next
            raise EpcError(line)
        yield f"{cmd} {flag}={value[:30]!r}", Case(
            flag, run, names=(flag,), expect="accept" if valid else "refuse")


GENERATORS = {"ir": ir_cases, "bundle": bundle_cases, "program": program_cases,
              "onnx": onnx_cases, "data": data_cases, "options": options_cases}


# =========================================================================== the run
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(cases: dict[str, int], seed: int = 0, budget_mb: float = BUDGET_MB,
        log: Callable[[str], None] = lambda s: None) -> dict:
    """Run `cases[cls]` cases of each class; returns the summary (counts per class and
    outcome, failures with their reproducing ids, peak memory)."""
    import numpy as np
    import torch
    torch.set_num_threads(1)
    os.environ["EPC_MEMORY_LIMIT"] = MEMORY_LIMIT
    np.seterr(all="warn")
    summary = {"seed": seed, "memory_limit": MEMORY_LIMIT, "budget_mb": budget_mb,
               "classes": {}, "failures": []}
    with tempfile.TemporaryDirectory(prefix="epc-fuzz-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        seeds = make_seeds(work)
        summary["seed_seconds"] = round(time.perf_counter() - t0, 2)
        start_peak = _peak_mb()
        summary["start_rss_mb"] = round(_rss_mb(), 1)
        for cls in CLASSES:
            n = cases.get(cls, 0)
            if not n:
                continue
            rng = random.Random(f"{seed}:{cls}")
            cdir = work / cls
            cdir.mkdir()
            gen = GENERATORS[cls](seeds, rng, cdir)
            counts = {"cases": 0, "accepted": 0, "refused": 0, "internal": 0, "failed": 0}
            t1 = time.perf_counter()
            for i in range(n):
                label, case = next(gen)
                outcome, value, message, caught = _classify(case)
                failure = _judge(case, outcome, value, message, caught)
                grown = _peak_mb() - start_peak
                if not failure and grown > budget_mb:
                    failure = f"peak memory grew {grown:.0f} MB (budget {budget_mb} MB)"
                    start_peak = _peak_mb()      # report each crossing once
                counts["cases"] += 1
                counts[outcome] += 1
                if failure:
                    counts["failed"] += 1
                    summary["failures"].append({"class": cls, "seed": seed, "index": i,
                                                "case": label, "outcome": outcome,
                                                "failure": failure})
                    log(f"FAIL {cls}#{i} {label}: {failure}")
            counts["seconds"] = round(time.perf_counter() - t1, 2)
            summary["classes"][cls] = counts
            log(f"{cls}: {counts}")
        summary["peak_rss_growth_mb"] = round(_peak_mb() - start_peak, 1)
    summary["cases"] = sum(c["cases"] for c in summary["classes"].values())
    summary["failed"] = len(summary["failures"])
    return summary


def show(cls: str, seed: int, index: int) -> int:
    """Regenerate case `index` of `cls` (the generators depend on the seed alone) and copy
    its input files to the current directory."""
    with tempfile.TemporaryDirectory(prefix="epc-fuzz-") as tmp:
        work = Path(tmp)
        seeds = make_seeds(work)
        cdir = work / cls
        cdir.mkdir()
        gen = GENERATORS[cls](seeds, random.Random(f"{seed}:{cls}"), cdir)
        for _ in range(index + 1):
            label, case = next(gen)
        print(label)
        for p in sorted(cdir.rglob("*")):
            if p.is_file() and not p.name.startswith("orig-"):
                dst = Path(f"fuzz-case-{p.name}")
                shutil.copy(p, dst)
                print(f"-> {dst}")
                if p.suffix in (".epir", ".nca"):
                    print(p.read_text(errors="replace")[:4000])
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=None,
                    help="total cases, spread over the classes as the CI run is (default: "
                         f"the CI run, {sum(CI_CASES.values())} cases)")
    ap.add_argument("--only", choices=CLASSES, action="append", help="only these classes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-mb", type=float, default=BUDGET_MB)
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--quiet", "-q", action="store_true")
    ap.add_argument("--show", type=int, metavar="INDEX",
                    help="with one --only CLASS: copy that case's input to ./fuzz-case* "
                         "(and print a text input) instead of running")
    a = ap.parse_args(argv)
    if a.show is not None:
        return show((a.only or ["ir"])[0], a.seed, a.show)
    classes = a.only or list(CLASSES)
    total_ci = sum(CI_CASES[c] for c in classes)
    scale = (a.cases / total_ci) if a.cases else 1.0
    cases = {c: max(1, round(CI_CASES[c] * scale)) for c in classes}
    summary = run(cases, a.seed, a.budget_mb,
                  log=(lambda s: None) if a.quiet else (lambda s: print(s, flush=True)))
    text = json.dumps(summary, indent=1)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(json.dumps({k: summary[k] for k in ("cases", "failed", "peak_rss_growth_mb")}))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
