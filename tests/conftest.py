"""Shared fixtures: paths to the committed example models, CLI runners, a small bundle."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Two shared cores: one intra-op thread avoids the stalls small matmuls get with two.
torch.set_num_threads(1)


def one_error_line(code: int, err: str) -> str:
    """The text of the one `epc: error:` line a refused command printed with exit status 2
    (asserting that is all it printed on stderr)."""
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("epc: error: "), (code, err)
    return lines[0][len("epc: error: "):]


@pytest.fixture
def run_cli(capsys):
    """Run `epc ARGS...` in-process through the entry point; returns (exit status, stdout,
    stderr)."""
    from epc.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def examples() -> Path:
    return EXAMPLES


@pytest.fixture
def cli():
    """Run `epc ARGS...` through click's test runner (stdout and stderr as a pipe sees
    them, errors one line with their exit status, as from the console script); returns
    click's Result (exit_code, stdout, stderr). `env` sets environment variables for the
    run (e.g. COLUMNS)."""
    from typer.testing import CliRunner

    from epc.cli import app
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # newer click: stderr is always separate
        runner = CliRunner()

    def run(*args, env: dict | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env)
    return run


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory) -> str:
    """A small torch bundle (64-32-10 MLP, caps of 60 free / 20 nudged sweeps)."""
    from epc.runtime import zoo
    from epc.targets.torch import emit
    p = tmp_path_factory.mktemp("m") / "mlp.epc"
    emit(zoo.mlp((64, 32, 10), max_sweeps=60, nudge_sweeps=20), p, None)
    return str(p)


@pytest.fixture(scope="session")
def example_bundles(tmp_path_factory) -> dict:
    """The digits example nets compiled for the torch runtime (once per session): name ->
    bundle path."""
    import epc
    d = tmp_path_factory.mktemp("examples")
    out = {}
    for name in ("mlp_digits", "mlp3_digits", "conv_digits", "conv1_digits"):
        out[name] = str(d / f"{name}.epc")
        epc.compile(EXAMPLES / f"{name}.onnx", target="torch", output=out[name])
    return out
