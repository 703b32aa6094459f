"""The text IR carrying weights: `= seeded(...)` recipes and literal tensors.

What is checked: texts round-trip exactly in each printing mode; literals give back the
very same arrays (float32 bit patterns included); a recipe means what ir.Seeded says and is
printed only while the data is still what it makes; bundles keep declarations only; bad
weight data is an IRSyntaxError naming the line; a seeded text compiles through the
pipeline like the same graph built in memory, and a declared-only one is refused.
"""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from epc.compiler.bundle import Bundle, bundle_bytes, read_bundle, write_bundle
from epc.compiler.errors import EpcError, IRSyntaxError
from epc.compiler.ir import Seeded, WeightSpec
from epc.compiler.options import CompileOptions
from epc.api import compile_source
from epc.compiler.text import looks_like_ir, parse, print_graph

TEXT = """epc-ir 1
graph g {
  input x : [2]
  weight a : f32[3, 2] = seeded(7)
  weight b : f32[3] = [0.5, -1.0, 0.1]
  weight c : f32[3] = seeded(8, lo=0.5, hi=1.5)
  weight d : f32[2, 2]
  weight e : i64[2] = [3, -4]
  weight s : f64[] = 1e-300
  weight z : f32[0, 2] = []
  node fc = dense(x) [weight=@a] : [3]
  output fc
}
"""


def test_round_trip_in_every_mode():
    g = parse(TEXT)
    assert print_graph(g, weights="inline") == TEXT
    for mode in ("shapes", "seeded", "inline"):
        text = print_graph(g, weights=mode)
        assert print_graph(parse(text), weights=mode) == text
    shapes = print_graph(g, weights="shapes")
    assert "] = " not in shapes and "weight a : f32[3, 2]\n" in shapes
    seeded = print_graph(g)                      # the default
    assert "weight a : f32[3, 2] = seeded(7)\n" in seeded
    assert "weight c : f32[3] = seeded(8, lo=0.5, hi=1.5)\n" in seeded
    assert "weight b : f32[3]\n" in seeded       # a literal is data: declared only here
    assert isinstance(g.weights["d"], WeightSpec)
    assert g.weights["e"].dtype == np.int64 and g.weights["e"].tolist() == [3, -4]
    assert g.weights["s"].shape == () and g.weights["s"].dtype == np.float64
    assert g.weights["z"].shape == (0, 2)
    assert g.weights["b"].dtype == np.float32
    np.testing.assert_array_equal(g.weights["b"], np.float32([0.5, -1.0, 0.1]))


def test_literals_are_exact():
    """Every float32 bit pattern (a sample, with -0.0 and extremes) and float64 values
    read back bit for bit."""
    g = parse(TEXT)
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = np.concatenate([x[np.isfinite(x)], np.float32([-0.0, 0.0, 1e-45, 3.4028235e38])])
    g.weights["r"] = x.reshape(-1, 2) if len(x) % 2 == 0 else x[:-1].reshape(-1, 2)
    g.weights["q"] = rng.standard_normal((5, 3)) * 10.0 ** rng.integers(-200, 200, (5, 3))
    back = parse(print_graph(g, weights="inline"))
    for name in ("r", "q", "b"):
        assert back.weights[name].dtype == g.weights[name].dtype
        assert back.weights[name].tobytes() == g.weights[name].tobytes(), name
    assert "0.1" in print_graph(g, weights="inline")    # shortest float32 digits


def test_seeded_is_what_ir_seeded_defines():
    g = parse("epc-ir 1\ngraph g {\n  input x : [2, 5, 5]\n"
              "  weight w : f32[3, 2, 2, 2] = seeded(11)\n"
              "  weight v : f32[4] = seeded(11, lo=-3.0, hi=-2.0)\n"
              "  weight u : f64[4] = seeded(12)\n}\n")
    # conv weight: fan_in 2*2*2 = 8, uniform in +-1/sqrt(8), RandomState(11), float32
    want = np.random.RandomState(11).uniform(-8 ** -0.5, 8 ** -0.5, (3, 2, 2, 2))
    np.testing.assert_array_equal(g.weights["w"], want.astype(np.float32))
    want = np.random.RandomState(11).uniform(-3.0, -2.0, 4)
    np.testing.assert_array_equal(g.weights["v"], want.astype(np.float32))
    assert g.weights["u"].dtype == np.float64 and np.all(np.abs(g.weights["u"]) <= 1.0)
    assert g.seeds["w"] == Seeded(11) and g.seeds["v"] == Seeded(11, -3.0, -2.0)
    assert not np.array_equal(Seeded(1).make((4,)), Seeded(2).make((4,)))


def test_a_recipe_is_printed_only_while_it_makes_the_data():
    g = parse(TEXT)
    g.weights["a"] = g.weights["a"] * np.float32(2.0)        # a pass rescaled it
    assert "weight a : f32[3, 2]\n" in print_graph(g)
    inline = print_graph(g, weights="inline")
    assert "seeded(7)" not in inline
    np.testing.assert_array_equal(parse(inline).weights["a"], g.weights["a"])
    h = g.copy()                                             # copies keep the recipes
    assert h.seeds == g.seeds and "seeded(8, lo=0.5, hi=1.5)" in print_graph(h)


def test_bundle_keeps_declarations_and_reads_text_data(tmp_path):
    g = parse(TEXT)
    g.weights["d"] = np.ones((2, 2), np.float32)
    write_bundle(tmp_path / "g.epc", Bundle(g))
    with zipfile.ZipFile(tmp_path / "g.epc") as z:
        ir = z.read("graph.ir").decode()
    assert ir == print_graph(g, weights="shapes") and "seeded" not in ir
    back = read_bundle(tmp_path / "g.epc").graph
    for k, v in g.weights.items():
        assert back.weights[k].tobytes() == v.tobytes() and back.weights[k].dtype == v.dtype
    # a bundle whose graph.ir carries the data itself (no weights/*.npy) reads too
    raw = io.BytesIO(bundle_bytes(Bundle(g)))
    out = io.BytesIO()
    with zipfile.ZipFile(raw) as zin, zipfile.ZipFile(out, "w") as zout:
        for m in zin.namelist():
            if m == "graph.ir":
                zout.writestr(m, print_graph(g, weights="inline"))
            elif not m.startswith("weights/"):
                zout.writestr(m, zin.read(m))
    (tmp_path / "t.epc").write_bytes(out.getvalue())
    back = read_bundle(tmp_path / "t.epc").graph
    for k, v in g.weights.items():
        assert back.weights[k].tobytes() == v.tobytes()


def test_a_literal_may_break_lines_inside_brackets():
    g = parse("epc-ir 1\ngraph g {\n  input x : [2]\n  weight w : f32[2, 2] = [\n"
              "    [1.0, 2.0],   # row 0\n    [3.0, 4.0]\n  ]\n}\n")
    np.testing.assert_array_equal(g.weights["w"], [[1, 2], [3, 4]])


@pytest.mark.parametrize("decl, message", [
    ("f32[2, 2] = [[1.0, 2.0], [3.0]]", "1 entries at depth 1, its shape [2, 2] says 2"),
    ("f32[2] = [1.0, 2.0, 3.0]", "3 entries at depth 0"),
    ("f32[2] = [1.0, x]", "expected a number"),
    ("i64[2] = [1, 2.5]", "expected an integer"),
    ("i8[2] = [1, 300]", "does not fit int8"),
    ("i64[2] = seeded(3)", "seeded weights are floating point"),
    ("f32[2] = seeded(-1)", "a seed is an integer"),
    ("f32[2] = seeded(1, lo=0.5)", "both lo= and hi="),
    ("f32[2] = seeded(1, lo=2.0, hi=1.0)", "lo < hi"),
    ("f32[2] = seeded(1, mid=2.0)", "lo= and hi="),
    ("q7[2] = [1, 2]", "unknown dtype 'q7' (supported: f32"),
])
def test_bad_weight_data_names_the_line(decl, message):
    text = f"epc-ir 1\ngraph g {{\n  input x : [2]\n  weight w : {decl}\n}}\n"
    with pytest.raises(IRSyntaxError, match="^<text>:4:") as e:
        parse(text)
    assert message in str(e.value)


def test_names_starting_like_numbers_are_names():
    g = parse("epc-ir 1\ngraph g {\n  input inf_x : [2]\n  weight nan_w : f32[2, 2]\n"
              "  node infer = dense(inf_x) [weight=@nan_w] : [2]\n  output infer\n}\n")
    assert g.inputs[0].name == "inf_x" and "nan_w" in g.weights


def test_looks_like_ir_skips_comments():
    assert looks_like_ir(b"# RUN: x\n\n  # more\nepc-ir 1\ngraph")
    assert looks_like_ir(b"epc-ir 1\n")
    assert not looks_like_ir(b"# only a comment\n")
    assert not looks_like_ir(b"\x08\x01onnx")


SEEDED_MLP = """# a two-layer perceptron with its weights drawn from seeds
epc-ir 1
graph tiny {
  input x : [4]
  weight fc1.bias : f32[3] = seeded(2)
  weight fc1.weight : f32[3, 4] = seeded(1)
  weight fc2.weight : f32[2, 3] = [[0.5, -0.25, 1.0], [0.0, 0.75, -0.5]]
  node fc1 = dense(x) [weight=@fc1.weight] : [3]
  node fc1_b = bias(fc1) [weight=@fc1.bias] : [3]
  node relu = act(fc1_b) [fn=relu()] : [3]
  node fc2 = dense(relu) [weight=@fc2.weight] : [2]
  output fc2
}
"""


def test_the_pipeline_compiles_seeded_text(tmp_path):
    src = tmp_path / "tiny.epir"
    src.write_text(SEEDED_MLP)
    res = compile_source(str(src), CompileOptions())
    assert res.source.kind == "text" and res.graph.is_energy
    # the same graph built in memory compiles to the same IR and weights
    ff = parse(SEEDED_MLP)
    ff.seeds.clear()
    from epc.compiler.pipeline import compile_graph
    want = compile_graph(ff, CompileOptions().check())
    assert print_graph(res.graph, weights="shapes") == print_graph(want, weights="shapes")
    assert sorted(res.graph.weights) == sorted(want.weights)
    for k, v in want.weights.items():
        assert res.graph.weights[k].tobytes() == v.tobytes(), k
    assert "weight fc1.weight : f32[3, 4] = seeded(1)\n" in print_graph(res.graph)
    np.testing.assert_array_equal(res.graph.weights["fc1.weight"], Seeded(1).make((3, 4)))
    # a text that only declares a weight cannot be compiled: one error naming the weight
    src.write_text(SEEDED_MLP.replace(" = seeded(1)", ""))
    with pytest.raises(EpcError, match="weight fc1.weight has no data in the IR text"):
        compile_source(str(src), CompileOptions())
