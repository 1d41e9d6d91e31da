"""The real default job (`make run`): pretrained MiniLM-MoE, full BBC News, 10 rounds.

Slow (about 6 minutes on 2 cores): excluded from `make test`; run with `pytest -m slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .support.cli import run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_job_learns_the_topics(tmp_path):
    run_dir = tmp_path / "default"
    proc = run_cli(
        "run", str(REPO / "configs" / "default.toml"), "-o", str(run_dir), "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_test_accuracy"] >= 0.80  # 5 classes: chance is 0.2
