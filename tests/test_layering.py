"""The package layering, enforced: import-linter checks the contracts in pyproject.toml
(driver > runtime > targets | frontends > compiler, the driver imported by nothing below
it, no source loading below the driver, no import cycles; imports inside functions count).

pyproject.toml maps the design card's folders (compiler/, runtime/, ...) into the `epc`
namespace, which the installed package resolves through an import hook that
import-linter's graph builder does not follow. So the test lays the sources out as
installed (epc/, epc/compiler/, ...) in a temporary folder and lints that copy, in a
subprocess that imports `epc` from there.

Run alone: python -m pytest tests/test_layering.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info < (3, 11):   # import-linter needs 3.11; CI and the README's set-up have it
    pytest.skip("import-linter needs Python 3.11", allow_module_level=True)

import importlinter  # noqa: E402,F401 - the test extra installs it: a missing one must fail
import tomllib  # noqa: E402


def lay_out_as_installed(dest: Path, edit: tuple[str, str] | None = None) -> Path:
    """Copy every package's modules to where `import epc...` finds them once installed;
    `edit` = (module path under dest, a line to append) plants an import for the test."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pkg, folder in cfg["tool"]["setuptools"]["package-dir"].items():
        d = dest / pkg.replace(".", "/")
        d.mkdir(parents=True, exist_ok=True)
        for f in (ROOT / folder).glob("*.py"):
            shutil.copy2(f, d / f.name)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    if edit is not None:
        with open(dest / edit[0], "a") as f:
            f.write("\n" + edit[1] + "\n")
    return dest


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree))   # `epc` from the copy, not the install
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", code, "--no-cache", "--no-logo",
                           str(tree / "pyproject.toml")],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def test_the_layering_contracts_hold(tmp_path):
    r = lint(lay_out_as_installed(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout and "4 kept" in r.stdout, r.stdout


@pytest.mark.parametrize("module,line,broken", [
    # the compiler reaching up into the runtime, even from inside a function
    ("epc/compiler/verify.py", "def _late():\n    import epc.runtime.engine",
     "nothing imports upwards"),
    # a target loading a source model
    ("epc/targets/torch.py", "from epc.frontends import onnx", "import no frontend"),
    # the runtime importing the driver
    ("epc/runtime/data.py", "import epc.api", "imported by nothing"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, broken):
    """The check can fail: one planted import breaks the contract it should."""
    r = lint(lay_out_as_installed(tmp_path, (module, line)))
    assert r.returncode == 1, r.stdout + r.stderr
    report = r.stdout.split("Broken contracts", 1)[-1]
    assert broken in report, r.stdout
