"""Keep freed tensor memory in the process heap, so that settling does not page-fault.

A settle sweep allocates and frees a few state-sized tensors (drives, unpooled
feedback, new states): 1-4 MiB each for a conv net at batch 64-128. glibc's malloc serves
such sizes with fresh `mmap`s until its adaptive threshold has grown past them, and gives
the top of its heap back to the kernel whenever more than its trim threshold (twice that
adaptive value) is free there. Both make the next sweep fault the same pages in again,
zero-filled by the kernel: measured on `conv1_digits` (one [64, 8, 8] state) at batch 64,
2,800-6,900 minor faults per training step, and steps 1.1-1.5x slower than under the
thresholds below, with which it faults almost none (0-200). A ResNet-13 step on 32x32
inputs at batch 32 faults 23,000-27,000 pages under glibc's defaults and 1,500-2,600
under these (a few percent of its time: its convolutions dominate). What glibc does
depends on the history of the process's allocations, so it also makes timings vary from
run to run.

`retain_freed_memory()` fixes both thresholds (mallopt), which also turns the adaptation
off: blocks under MMAP_THRESHOLD come from the heap, and the heap keeps up to
TRIM_THRESHOLD of free memory at its top for the next sweep. The cost is that much memory
held after a peak. It changes where tensors live, never what is computed: results are the
same bits. It is process-wide, so the runtime's entry points (`train`, `evaluate`,
`check_gradients`, and through them the CLI) and the bench call it, and a library user can
too. Elsewhere than glibc (macOS, musl) it does nothing, and EPC_SYSTEM_MALLOC=1 in the
environment keeps the system's behaviour.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

MMAP_THRESHOLD = 32 << 20     # glibc's own ceiling for its adaptive threshold
TRIM_THRESHOLD = 256 << 20

_M_TRIM_THRESHOLD = -1       # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3

OPT_OUT = "EPC_SYSTEM_MALLOC"


def _glibc():
    """The C library if it is glibc (it has mallopt and gnu_get_libc_version), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache      # the setting is per process: the first call decides, later ones report
def retain_freed_memory() -> str:
    """Apply the thresholds once per process; returns what is in effect, in words (the
    metrics file and the bench record it)."""
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        return f"system malloc ({OPT_OUT} is set)"
    libc = _glibc()
    if libc is None:
        return "system malloc (not glibc)"
    if (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1):
        return (f"glibc malloc, mmap_threshold {MMAP_THRESHOLD >> 20} MiB, "
                f"trim_threshold {TRIM_THRESHOLD >> 20} MiB")
    return "system malloc (mallopt refused the thresholds)"
