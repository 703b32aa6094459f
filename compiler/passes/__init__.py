"""The compile passes, one module each, in pipeline order.

Each module exposes `run(graph, options) -> graph` (returning a new graph; the input is not
modified) and documents what it requires and ensures.
"""
from __future__ import annotations

from ..options import CompileOptions
from . import (canonicalize, pool_first, readout, residual, schedule, symmetrize, taps,
               teacher, to_energy)
from .manager import Pass, PassManager

PASS_NAMES: tuple[str, ...] = ("canonicalize", "pool_first", "to_energy", "symmetrize",
                               "residual", "taps", "teacher", "readout", "schedule")

_MODULES = {"canonicalize": canonicalize, "pool_first": pool_first, "to_energy": to_energy,
            "symmetrize": symmetrize, "residual": residual, "taps": taps, "teacher": teacher,
            "readout": readout, "schedule": schedule}


def build_pipeline(opts: CompileOptions | None = None) -> list[Pass]:
    """The default pipeline (every pass reads what it needs from the options at run time)."""
    return [Pass(name, _MODULES[name].run) for name in PASS_NAMES]


__all__ = ["PASS_NAMES", "build_pipeline", "Pass", "PassManager"]
