"""What a program costs the host that reads and simulates it, checked before it is paid.

A program declares its memories by shape: `.mem w weight s4 [65536,65536]` is 40 bytes of
assembly (and a binary holds only the skeleton for memories without data), yet the
simulator keeps every word of every memory as a float64, the validator settles one
sample through every chain, and a run keeps a batch of states. `check_program_memory`
bounds each memory's words (the validator's 2^28) and refuses a program whose memories,
for the batch to simulate, would take more than the memory limit (compiler/limits.py).
"""
from __future__ import annotations

import math

from epc.compiler.errors import EpcError
from epc.compiler.limits import check_memory

from .isa import Program

MAX_WORDS = 1 << 28        # words of one memory (the validator's bound)
MAX_RANK = 8
WORD_BYTES = 8             # the simulator keeps integers in float64 tensors
COPIES = 5                 # a batch's states while settling: current, previous, nudged, ...


def check_program_memory(prog: Program, where: str, batch: int = 1) -> None:
    """Refuse bad memory shapes, and memories that would not fit the memory limit when
    simulating `batch` samples (constant memories once, the others per sample)."""
    const = per_sample = 0
    for m in prog.memories:
        shape = tuple(m.shape)
        if not shape or len(shape) > MAX_RANK or any(
                not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in shape):
            raise EpcError(f"{where}: .mem {m.name}: bad shape {list(shape)} (1 to {MAX_RANK} "
                           f"positive dimensions)")
        n = math.prod(shape)
        if n > MAX_WORDS:
            raise EpcError(f"{where}: .mem {m.name}: {n:,} words, more than a core memory "
                           f"holds (2^28)")
        if m.kind in ("weight", "exp", "bias"):
            const += n
        else:
            per_sample += n
    check_memory(WORD_BYTES * (2 * const + COPIES * batch * per_sample),
                 f"simulating its memories ({const:,} constant words, {per_sample:,} state "
                 f"words per sample, {batch} sample{'s' if batch != 1 else ''})", where,
                 hint="lower --batch-size, or " if batch > 1 else "")
