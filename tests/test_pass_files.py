"""Focused pass tests written as IR text: tests/passes/*.epir.

Each file is an IR graph (weights seeded, literal or only declared) holding its own test
in `#` comment lines:

    # RUN: --pass NAME [--pass NAME ...] [option flags] [--weights MODE] [--check-prefix P]
    # CHECK: ...        FileCheck directives over the printed result (tests/filecheck.py)
    # P-ERROR: text     instead: the run fails with an EpcError containing text

A RUN line is what `epc opt FILE --pass NAME ...` does: compiler.passes.opt_text on the
file with those options. Option flags are CompileOptions fields written as flags
(--identity-skip learned, --pool-first, --no-feedback, --taps h1,h3); `--teacher FILE` reads
the feedforward teacher from tests/passes/inputs/FILE. `--weights` is how the result
prints weights ('seeded' unless given; 'inline' shows their values). The printed result
must also read back to the same text. Files under tests/passes/inputs/ are inputs only.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph
from epc.compiler.options import CompileOptions
from epc.compiler.passes import PASS_NAMES, opt_text
from epc.compiler.text import parse, print_graph
from filecheck import Directive, directives, filecheck

HERE = Path(__file__).parent / "passes"
FILES = sorted(HERE.glob("*.epir"))
_FIELDS = {f.name: f for f in dataclasses.fields(CompileOptions)}


@dataclasses.dataclass
class Run:
    passes: list[str]
    options: CompileOptions
    weights: str = "seeded"
    prefix: str = "CHECK"


def parse_run(args: str) -> Run:
    """A RUN line's arguments -> the passes, options and printing it asks for."""
    toks, run, kw = shlex.split(args), Run([], CompileOptions()), {}
    i = 0
    while i < len(toks):
        flag = toks[i]
        name = flag[2:].replace("-", "_")
        if flag in ("--pass", "--weights", "--check-prefix"):
            val = toks[i + 1]
            if flag == "--pass":
                run.passes.append(val)
            else:
                setattr(run, "weights" if flag == "--weights" else "prefix", val)
            i += 2
            continue
        neg = name.startswith("no_") and name[3:] in _FIELDS
        field = _FIELDS.get(name[3:] if neg else name)
        if field is None or name in ("source_path", "teacher_graph"):
            raise ValueError(f"RUN: unknown flag {flag}")
        # a switch: a bool option, or one whose None means 'not given' (pool_first)
        if isinstance(field.default, bool) or str(field.type).startswith("bool"):
            kw[field.name] = not neg
            i += 1
            continue
        val = toks[i + 1]
        kind = type(field.default) if field.default is not None else str
        kw[field.name] = kind(val) if kind in (int, float) else val
        i += 2
    if kw.get("teacher") not in (None, "source"):
        kw["teacher_graph"] = parse((HERE / "inputs" / kw["teacher"]).read_text(),
                                    source=kw["teacher"])
    run.options = CompileOptions(**kw)
    assert run.passes, "a RUN line names at least one --pass"
    return run


def cases():
    for path in FILES:
        runs = re.findall(r"^\s*#\s*RUN:(.*)$", path.read_text(), re.M)
        assert runs, f"{path.name}: no RUN line"
        for k, args in enumerate(runs):
            yield pytest.param(path, args, id=f"{path.stem}-{k}")


@pytest.mark.parametrize("path, args", list(cases()))
def test_pass_file(path: Path, args: str):
    text = path.read_text()
    run = parse_run(args)
    errors = re.findall(rf"^\s*#\s*{re.escape(run.prefix)}-ERROR:(.*)$", text, re.M)
    checks = directives(text, run.prefix)
    if errors:
        assert not checks, f"{path.name}: {run.prefix} has both ERROR and CHECK lines"
        with pytest.raises(EpcError) as e:
            opt_text(text, run.passes, run.options, source_name=path.name)
        for want in errors:
            assert want.strip() in str(e.value), str(e.value)
        return
    # a run without a positive check would assert nothing
    assert any(d.kind != "NOT" for d in checks), f"{path.name}: no {run.prefix}: lines"
    out = opt_text(text, run.passes, run.options, source_name=path.name, weights=run.weights)
    filecheck(out, checks, where=path.name)
    assert print_graph(parse(out), weights=run.weights) == out


def test_every_pass_has_focused_tests():
    """At least two RUN lines per pass whose last --pass is that pass."""
    count = {p: 0 for p in PASS_NAMES}
    for path in FILES:
        for args in re.findall(r"^\s*#\s*RUN:(.*)$", path.read_text(), re.M):
            count[parse_run(args).passes[-1]] += 1
    assert all(n >= 2 for n in count.values()), count


def test_teacher_inputs_are_graphs():
    for path in (HERE / "inputs").glob("*.epir"):
        assert isinstance(parse(path.read_text(), source=path.name), Graph)


# --------------------------------------------------------------------------- the helper
OUT = "alpha one\nbeta two\ngamma three\nbeta four\n"


def _d(spec: str) -> list[Directive]:
    return directives("\n".join("# " + s for s in spec.split(";")))


@pytest.mark.parametrize("spec", [
    "CHECK: beta", "CHECK: alpha;CHECK-NEXT: beta;CHECK-SAME: two",
    "CHECK: gamma;CHECK: four", "CHECK-NOT: delta;CHECK: alpha",
    "CHECK: alpha;CHECK-NOT: gamma;CHECK: two", "CHECK: {{g[a-z]+}} three",
    "CHECK: gamma;CHECK-NOT: alpha", "CHECK: one;CHECK-NEXT: beta {{t.o}}",
])
def test_filecheck_accepts(spec):
    filecheck(OUT, _d(spec))


@pytest.mark.parametrize("spec, why", [
    ("CHECK: delta", "not found after the previous match"),
    ("CHECK: gamma;CHECK: alpha", "not found after the previous match"),
    ("CHECK: alpha;CHECK-NEXT: gamma", "not found on the next line"),
    ("CHECK: beta;CHECK-SAME: one", "not found on the same line"),
    ("CHECK-NEXT: alpha", "has no previous match"),
    ("CHECK: alpha;CHECK-NOT: beta;CHECK: gamma", "found where it must not be"),
    ("CHECK-NOT: one;CHECK: gamma", "found where it must not be"),
    ("CHECK: gamma;CHECK-NOT: four", "found where it must not be"),
    ("CHECK: {{g[0-9]}}", "not found"),
    ("CHECK: one;CHECK: one", "not found after the previous match"),
])
def test_filecheck_rejects(spec, why):
    with pytest.raises(AssertionError, match=re.escape(why)):
        filecheck(OUT, _d(spec))
