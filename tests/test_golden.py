"""Golden metrics: the same seed gives the same metrics, bit for bit, as when they were recorded
(``tests/support/golden.py`` says how they were made and how to regenerate them on purpose).

Every registered algorithm (and HFedMoE in strict mode) on the tiny BERT-MoE with three device
tiers; the default job's golden metrics are checked by the slow ``test_default_job.py``.
Recorded on this project's CPU machine; floats are compared to 1e-6 relative, since another
CPU's kernels round differently in the last bits (``golden.same``). On a GPU the numbers differ
by more, so these tests run on the CPU only.
"""

from __future__ import annotations

import pytest

from .support import golden
from .support.configs import TEST_DEVICE

pytestmark = pytest.mark.skipif(TEST_DEVICE != "cpu", reason="recorded on the CPU")


def test_every_algorithm_has_a_golden_record():
    assert set(golden.expected(golden.TINY_RUNS)) == set(golden.CASES)


@pytest.mark.parametrize("case", list(golden.CASES))
def test_tiny_run_reproduces_its_golden_metrics(case, tiny_bert_dir, tmp_path):
    metrics = golden.run_case(tiny_bert_dir, case, tmp_path / case)
    assert golden.same(metrics, golden.expected(golden.TINY_RUNS)[case]) is None


@pytest.mark.parametrize("case", ["hfedmoe-strict", "flexmoe", "fedmoe"])
def test_the_wire_changes_nothing(case, tiny_bert_dir, tmp_path):
    """By reference (the embedded engine's default) and across Flower's wire format, every
    message gives the same run, bit for bit: partial downloads, node memory, uploads."""
    by_reference = golden.run_case(tiny_bert_dir, case, tmp_path / "ref")
    across = golden.run_case(tiny_bert_dir, case, tmp_path / "wire", check_wire=True)
    assert by_reference == across
