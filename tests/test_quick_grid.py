"""The comparison grid's quick profile on the real model, data and device tiers.

Slow (about 6 minutes here): excluded from `make test`; run with `pytest -m slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfedmoe.algorithms import ALGORITHMS

from .support.cli import run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_method_runs_the_quick_grid_and_reports(tmp_path):
    methods = sorted(ALGORITHMS)
    grid = tmp_path / "grid"
    proc = run_cli(
        "compare", str(REPO / "configs" / "hfedmoe.toml"), "--methods", ",".join(methods),
        "--seeds", "0", "--profile", "quick", "-o", str(grid), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = {m: json.loads((grid / m / "seed0" / "summary.json").read_text()) for m in methods}
    assert summaries["fedavg"]["failure_rate"] > 0.5  # only workstations hold full training
    for name, s in summaries.items():
        if name != "fedavg":
            assert s["failure_rate"] == 0, name  # budget-aware: nobody is asked for too much
    report = run_cli("report", str(grid), "-o", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert all(f"| {m} |" in md for m in methods)
