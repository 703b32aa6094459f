"""The memory limit: how much memory an input may make epc use beyond its own bytes.

A file's own contents cost what they weigh (a 40 MB bundle of stored weights is read as
40 MB), but several formats declare sizes they do not hold: a compressed zip member, a
`seeded(...)` weight in IR text, an ONNX ConstantOfShape, a program memory, the states a
graph settles per batch, images scaled up by --resize. Each is estimated (with the copies
the code makes of it) and checked against one limit before anything is allocated, so
that no small input can make a command take gigabytes:

* bundles: the bytes compressed members expand to (x2: the member and its array);
* IR text: its `seeded(...)` weights (x2: drawn in float64, then cast);
* ONNX: the constants folded at load time (x2);
* neuromorphic programs: the memories the simulator keeps (8 bytes a word, x2), for the
  batch it runs;
* train, eval, check-gradients: the states of the largest batch settled (x5: the free,
  nudged and previous states and their updates; measured 4.6-5.5 on the CIFAR examples);
* --resize / --channels: what the data set grows by (x2).

The limit is 1 GiB unless the environment variable EPC_MEMORY_LIMIT or a command's
--memory-limit flag (the Python API's `memory_limit=`) says otherwise, e.g. `4G` for a
big model or batch. Why one number: it protects the machine, not the model; a user who
trusts an input, or has the memory, raises it once.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
from typing import Iterator

from .errors import EpcError

DEFAULT_MEMORY_LIMIT = 1 << 30
ENV_VAR = "EPC_MEMORY_LIMIT"
FLAG = "--memory-limit"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

_scoped: contextvars.ContextVar[int | None] = contextvars.ContextVar("epc_memory_limit",
                                                                     default=None)


def parse_size(spec, what: str = FLAG) -> int:
    """'256M', '2G', '1.5g', '1000000' (bytes), or an int -> bytes (>= 1)."""
    if isinstance(spec, bool):
        raise EpcError(f"bad {what} {spec!r}: use a size such as 512M or 2G")
    if isinstance(spec, int):
        n = spec
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(spec), re.I)
        if not m or len(m.group(1)) > 15:
            raise EpcError(f"bad {what} {spec!r}: use a size such as 512M or 2G (bytes, or "
                           f"with a K, M, G or T suffix)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if not 1 <= n <= 1 << 50:
        raise EpcError(f"bad {what} {spec!r}: must be between 1 byte and 1P")
    return n


def memory_limit() -> int:
    """The limit in force: the innermost `scoped_memory_limit`, else EPC_MEMORY_LIMIT,
    else 1 GiB."""
    v = _scoped.get()
    if v is not None:
        return v
    env = os.environ.get(ENV_VAR, "").strip()
    return parse_size(env, ENV_VAR) if env else DEFAULT_MEMORY_LIMIT


@contextlib.contextmanager
def scoped_memory_limit(spec) -> Iterator[int]:
    """Within the block the limit is `spec` (None: unchanged); what each command of the
    driver runs under when given --memory-limit."""
    if spec is None:
        yield memory_limit()
        return
    token = _scoped.set(parse_size(spec))
    try:
        yield _scoped.get()
    finally:
        _scoped.reset(token)


def fmt_bytes(n: float) -> str:
    for unit, k in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= k:
            return f"{n / k:.3g}{unit}"
    return f"{int(n)} bytes"


def check_memory(nbytes: float, what: str, where: str, hint: str = "") -> None:
    """Refuse an estimate of `nbytes` (for `what`, declared by `where`) above the limit;
    `hint` adds another way out (e.g. a smaller --batch-size)."""
    limit = memory_limit()
    if nbytes > limit:
        raise EpcError(f"{where}: {what} would take about {fmt_bytes(nbytes)}, over the "
                       f"memory limit of {fmt_bytes(limit)}; {hint}if the input is trusted "
                       f"and the memory there, raise it with {FLAG} SIZE or {ENV_VAR}=SIZE")


def numel(shape) -> int:
    """Elements of a shape, exactly (numpy's prod wraps around at 2^63)."""
    return math.prod(int(d) for d in shape)
