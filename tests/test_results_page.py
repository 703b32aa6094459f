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


def test_stochep_json_renders_its_section():
    """bench.stochep's JSON (tagged bench=stochep) is a StochEP table: one row per net,
    rate beside bernoulli with the bernoulli schedule, from the file's own figures."""
    import json
    paths = sorted(glob.glob(os.path.join(ROOT, "docs", "data", "stochep_*.json")))
    assert paths, "docs/data holds bench.stochep's JSON"
    for p in paths:
        with open(p) as f:
            doc = json.load(f)
        page = render([p])
        assert f"### StochEP: bernoulli vs rate neurons on {doc['data']}" in page
        for name, r in doc["runs"].items():
            sp = r["bernoulli"]["spiking"]
            row = next(l for l in page.splitlines() if l.startswith(f"| {name} |"))
            assert f"{sp['time_steps']}/{sp['nudge_time_steps']}, {sp['averaging']}:" \
                   f"{sp['tau']}" in row
            assert f"{100 * r['bernoulli']['test_accuracy']:.2f}%" in row
            assert f"{r['gap_points']:.2f}" in row
