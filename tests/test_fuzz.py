"""The CI-sized fuzz run (bench/fuzz.py): ~2,900 mutated inputs and command lines over IR
text, bundles, programs, ONNX, data and options, in a fresh process (its peak memory is
the run's own). Every case must be accepted (and mean what it says), or refused in one
line naming its input; none may be an internal error, print a warning, or grow the
process's peak memory past the budget. `python -m bench.fuzz --cases 20000` is the long
run; a failure names `--only CLASS --seed S --show INDEX` to reproduce it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fuzz_ci_run(tmp_path):
    out = tmp_path / "fuzz.json"
    r = subprocess.run([sys.executable, "-m", "bench.fuzz", "--seed", "0", "--json", str(out),
                        "-q"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = json.loads(out.read_text())
    failures = "\n".join(f"{f['class']} seed {f['seed']} #{f['index']} {f['case']}: "
                         f"{f['failure']}" for f in summary["failures"][:20])
    assert r.returncode == 0 and summary["failed"] == 0, failures or r.stderr[-3000:]
    from bench.fuzz import CI_CASES
    for cls, n in CI_CASES.items():
        c = summary["classes"][cls]
        assert c["cases"] == n and c["internal"] == 0, (cls, c)
        # both ways out are exercised (options: valid values reach the missing model)
        assert c["accepted"] >= n // 50 and c["refused"] >= n // 5, (cls, c)
    assert summary["peak_rss_growth_mb"] <= summary["budget_mb"]
