"""Shared fixtures: paths to the committed example models, a CLI runner."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Two shared cores: one intra-op thread avoids the stalls small matmuls get with two.
torch.set_num_threads(1)


@pytest.fixture
def run_cli(capsys):
    """Run `epc ARGS...` in-process; returns (exit status, stdout, stderr)."""
    from epc.compiler.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def examples() -> Path:
    return EXAMPLES
