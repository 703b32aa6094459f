"""Python API of the neuromorphic target: program files, and compiling an energy graph
into a program.

    compile_program(graph, "mlp.nc", weight_bits=8)
    prog = load_program("mlp.nc")
    save_program(prog, "mlp.nca")

A program file is binary (magic EPCNC, version, CRC32) unless its name ends in .nca or .s,
which holds the assembly text; both load the same way. Running and training programs is the
runtime's (the simulator, runtime/programs.py); calibrating on real activations is the
driver's orchestration (it settles the float runtime and hands the equilibria in).
"""
from __future__ import annotations

import math
import os
from typing import Callable

from epc.compiler.bundle import atomic_write_bytes
from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph

from .assembler import assemble, disassemble
from .binary import from_bytes, to_bytes
from .isa import ASM_HEADER, MAGIC, Program
from .quantize import quantize_graph
from .size import check_program_memory
from .validate import AccumulatorOverflow, validate

ASM_SUFFIXES = (".nca", ".s")


# --------------------------------------------------------------------------- files
def is_program(path) -> bool:
    """True for a binary program (magic bytes) or assembly text (header line)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    if head.startswith(MAGIC):
        return True
    for line in head.decode("utf-8", "replace").splitlines():
        line = line.split(";", 1)[0].strip()
        if line:
            return line.split()[0] == ASM_HEADER
    return False


def load_program(path) -> Program:
    """Read and validate a program (binary or assembly); EpcError on any problem."""
    path = str(path)
    if not os.path.exists(path):
        raise EpcError(f"{path}: no such file")
    if os.path.isdir(path):
        raise EpcError(f"{path}: is a directory, expected a neuromorphic program")
    from epc.compiler.bundle import is_bundle
    if is_bundle(path):
        raise EpcError(f"{path}: an epc bundle (a float graph), not a neuromorphic program; "
                       f"use `epc eval`, or compile it with `epc compile {path} --target "
                       f"neuromorphic`")
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise EpcError(f"{path}: cannot read ({e.strerror or e})") from None
    if buf.startswith(MAGIC):
        prog = from_bytes(buf, source=path)
    else:
        try:
            text = buf.decode("utf-8")
        except UnicodeDecodeError:
            raise EpcError(f"{path}: not a neuromorphic program (neither the binary magic "
                           f"{MAGIC[:5].decode()} nor UTF-8 assembly text)")
        prog = assemble(text, source=path)
        check_program_memory(prog, path)
    return validate(prog, source=path)


def save_program(prog: Program, path) -> None:
    path = str(path)
    if path.endswith(ASM_SUFFIXES):
        atomic_write_bytes(path, disassemble(prog).encode("utf-8"))
    else:
        atomic_write_bytes(path, to_bytes(prog))


# --------------------------------------------------------------------------- compile
def compile_program(graph: Graph, out_path, *, weight_bits: int = 8, frac_bits: int = 8,
                    per_channel: bool = False,
                    calibration: Callable[[Graph], dict] | None = None,
                    calibrated_on: str | None = None, seed: int = 0) -> Program:
    """Quantize an energy graph into a validated program and write it (atomically).

    `calibration`, if given, returns real activations of the graph (state name -> array of
    free equilibria on a data sample, clamped inputs included); it is called only once the
    graph is known to quantize, so a graph the core cannot express is refused before any
    time goes into settling. `calibrated_on` names the data for the program's metadata."""
    from epc.compiler.verify import verify
    verify(graph)
    if not 4 <= weight_bits <= 8:
        raise EpcError(f"--weight-bits {weight_bits}: the core supports 4 to 8 bit mantissas")
    if not 1 <= frac_bits <= 12:
        raise EpcError(f"--frac-bits {frac_bits}: supported 1 to 12")
    # refuse what cannot be expressed before spending time on calibration
    quantize_graph(graph, weight_bits=weight_bits, frac_bits=frac_bits,
                   per_channel=per_channel, seed=seed)
    acts = calibration(graph) if calibration is not None else None
    prog = quantize_graph(graph, weight_bits=weight_bits, frac_bits=frac_bits,
                          per_channel=per_channel, acts=acts, seed=seed)
    if calibrated_on:
        prog.meta["calibrated_on"] = calibrated_on
    try:
        validate(prog, source=f"{out_path} (compiled from graph {graph.name})")
    except AccumulatorOverflow as e:
        raise EpcError(f"{e}; {_narrower(graph, e.excess, weight_bits, frac_bits, per_channel, seed)}") \
            from None
    save_program(prog, out_path)
    return prog


def check_program(graph: Graph, *, weight_bits: int = 8, frac_bits: int = 8,
                  per_channel: bool = False, seed: int = 0) -> Program:
    """compile_program without calibration and without writing: the program, validated
    (EpcError for what the core cannot express or hold, with the overflow fix)."""
    from epc.compiler.verify import verify
    verify(graph)
    if not 4 <= weight_bits <= 8:
        raise EpcError(f"--weight-bits {weight_bits}: the core supports 4 to 8 bit mantissas")
    if not 1 <= frac_bits <= 12:
        raise EpcError(f"--frac-bits {frac_bits}: supported 1 to 12")
    prog = quantize_graph(graph, weight_bits=weight_bits, frac_bits=frac_bits,
                          per_channel=per_channel, seed=seed)
    try:
        return validate(prog, source=f"graph {graph.name}")
    except AccumulatorOverflow as e:
        raise EpcError(f"{e}; {_narrower(graph, e.excess, weight_bits, frac_bits, per_channel, seed)}") \
            from None


def _narrower(graph: Graph, excess: float, weight_bits: int, frac_bits: int,
              per_channel: bool, seed: int) -> str:
    """The fix for an accumulator overflow, checked: the first of fewer fractional bits,
    narrower mantissas, or both (from cutting `excess` bits on) whose program validates;
    or that none of those tried does."""
    need = max(1, math.ceil(excess))
    # fewer fractional bits alone first, then narrower mantissas alone, then both by the
    # bits cut in all: a first overflow's excess can understate what fits (a shift
    # overflows next), so the search goes down to the narrowest settings
    cands = [(f, weight_bits) for f in range(frac_bits - need, 0, -1)]
    cands += [(frac_bits, b) for b in range(weight_bits - need, 3, -1)]
    cands += sorted(((f, b) for f in range(frac_bits - 1, 0, -1)
                     for b in range(weight_bits - 1, 3, -1)),
                    key=lambda fb: (frac_bits - fb[0]) + (weight_bits - fb[1]))
    tried = []
    for f, b in cands:
        if (f, b) in tried:
            continue
        tried.append((f, b))
        if len(tried) > 32:
            break
        try:
            validate(quantize_graph(graph, weight_bits=b, frac_bits=f,
                                    per_channel=per_channel, seed=seed))
        except EpcError:
            continue
        flags = [f"--frac-bits {f}"] * (f != frac_bits) + \
                [f"--weight-bits {b}"] * (b != weight_bits)
        return f"it fits with {' '.join(flags)} (that program validates)"
    return (f"none of the {len(tried)} narrower settings of --frac-bits (>= 1) and "
            f"--weight-bits (>= 4) tried fits either; the weights' scale is too large for "
            f"the core")
