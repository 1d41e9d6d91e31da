"""Golden metrics: the same seed gives the same metrics, bit for bit, as when they were recorded
(``tests/support/golden.py`` says how they were made and how to regenerate them on purpose).

Every registered algorithm (and HFedMoE in strict mode) on the tiny BERT-MoE with three device
tiers; the default job is slow-marked. Recorded on this project's CPU machine: on a GPU the
numbers differ in the last bits, so these tests run on the CPU only.
"""

from __future__ import annotations

import json

import pytest

from hfedmoe.results import engine_independent

from .support import golden
from .support.cli import run_cli
from .support.configs import TEST_DEVICE

pytestmark = pytest.mark.skipif(TEST_DEVICE != "cpu", reason="recorded on the CPU")


def test_every_algorithm_has_a_golden_record():
    assert set(golden.expected(golden.TINY_RUNS)) == set(golden.CASES)


@pytest.mark.parametrize("case", list(golden.CASES))
def test_tiny_run_reproduces_its_golden_metrics(case, tiny_bert_dir, tmp_path):
    metrics = golden.run_case(tiny_bert_dir, case, tmp_path / case)
    assert metrics == golden.expected(golden.TINY_RUNS)[case]


@pytest.mark.slow
def test_default_job_reproduces_its_golden_metrics(tmp_path):
    config = golden.GOLDEN.parents[1] / "configs" / "default.toml"
    proc = run_cli("run", str(config), "-o", str(tmp_path / "run"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(json.dumps(engine_independent(tmp_path / "run")))
    assert metrics == golden.expected(golden.DEFAULT_JOB)
