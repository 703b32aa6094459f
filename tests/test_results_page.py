"""docs/results.md is generated from the committed benchmark JSON, never edited by hand."""
from __future__ import annotations

import glob
import os

from bench.report import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_results_page_is_what_bench_report_makes_of_the_committed_json():
    data = sorted(glob.glob(os.path.join(ROOT, "docs", "data", "*.json")))
    assert data, "docs/data/ holds the benchmark JSON the results page is made from"
    with open(os.path.join(ROOT, "docs", "results.md")) as f:
        page = f.read()
    assert page == render(data), ("docs/results.md is stale: regenerate it with "
                                  "python -m bench.report docs/data/*.json -o docs/results.md")
