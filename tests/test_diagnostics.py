"""The measured "why" of HFedMoE (maths.diagnostics), by hand, and recorded in a real run."""

from __future__ import annotations

import math

import pytest
import torch

from hfedmoe.algorithms.maths.diagnostics import excluded_updates, usage_overlap, weight_distance
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.foundation.config import validate
from hfedmoe.results import read_metrics

from .support.configs import tiny_raw


def test_overlap_of_the_updated_experts_with_the_most_used():
    u = torch.tensor([[0.5, 0.1, 0.3], [0.05, 0.02, 0.03]])
    # updated: (0,0) and (1,0); the two most used are (0,0) and (0,2): one of two
    updated = torch.tensor([[3, 0, 0], [1, 0, 0]])
    assert usage_overlap(u, updated) == pytest.approx(0.5)
    assert usage_overlap(u, torch.tensor([[1, 0, 2], [0, 0, 0]])) == 1.0
    assert math.isnan(usage_overlap(u, torch.zeros(2, 3)))


def test_the_updates_eq17_leaves_out():
    qualifies = torch.tensor([[True, False, False], [True, True, False]])
    updated = torch.tensor([[2, 1, 0], [0, 4, 1]])  # 4 experts updated; (0,1) and (1,2) excluded
    assert excluded_updates(qualifies, updated) == (2, 4)


def test_distance_between_two_weightings_of_the_clients():
    assert weight_distance(torch.tensor([1.0, 1.0]), torch.tensor([5.0, 5.0])) == 0.0
    # (0.75, 0.25) against (0.5, 0.5): 0.5 x (0.25 + 0.25)
    assert weight_distance(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.0])) == 0.25
    assert weight_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert math.isnan(weight_distance(torch.zeros(2), torch.ones(2)))


@pytest.mark.parametrize("algorithm", ["hfedmoe", "hfedmoe-holder-avg", "hfedmoe-fedavg-routers"])
def test_a_run_records_why(algorithm, tiny_bert_dir, tmp_path):
    raw = tiny_raw(tiny_bert_dir, algorithm=algorithm)
    raw["federation"]["rounds"] = 1
    run_embedded(validate(raw), str(tmp_path / "run"), server_app, client_app)
    record = read_metrics(tmp_path / "run")[-1]
    assert 0 <= record["eq17_excluded_share"] <= 1
    assert 0 <= record["router_weight_tv_mean"] <= 1
    if algorithm == "hfedmoe-holder-avg":
        assert record["eq17_excluded_share"] == 0.0  # holder averaging counts every update
    if algorithm == "hfedmoe-fedavg-routers":
        assert record["router_weight_tv_mean"] == 0.0  # routers weighted by |D_c|
    for client in record["clients"]:
        assert client["active_usage_overlap"] is None or 0 <= client["active_usage_overlap"] <= 1
