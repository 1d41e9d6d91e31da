"""Device budgets (METHOD.md §6): tiers over clients, the cost model by hand, the cost model
against measured memory and counted FLOPs, and budgets in a real federated run."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hfedmoe.budget import (
    BudgetExceeded,
    CostModel,
    Price,
    assign_tiers,
    build_cost_model,
    check_request,
    check_tiers,
    probe_batch,
    tier_counts,
)
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.federation.workload import client_model, label_names
from hfedmoe.foundation.config import DeviceTier, validate
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.model.experts import ExpertModel
from hfedmoe.results import read_metrics

from .support.calibration import MEASURE_SMALL_DEVICE, count_step_flops
from .support.configs import tiny_raw
from .support.tiers import three_tiers

REPO = Path(__file__).resolve().parents[1]

# ---- which client has which device --------------------------------------------------------


def test_tier_counts_split_clients_by_largest_remainder():
    assert tier_counts([1, 1, 2], 8) == [2, 2, 4]
    assert tier_counts([1, 1, 1], 8) == [3, 3, 2]  # 2.67 each: the first two get the remainder
    assert tier_counts([0.5, 0.3, 0.2], 10) == [5, 3, 2]
    assert sum(tier_counts([0.1, 0.7, 0.2], 7)) == 7


def _tiers(*specs: tuple[str, int, float]) -> dict:
    return {"tiers": [{"name": n, "memory": m, "share": s} for n, m, s in specs]}


def test_tiers_are_spread_over_clients_by_share_and_seed(tiny_bert_dir):
    raw = tiny_raw(
        tiny_bert_dir,
        federation={"num_clients": 8, "clients_per_round": 2},
        devices=_tiers(("small", 10**9, 1), ("large", 10**10, 3)),
    )
    tiers = assign_tiers(validate(raw))
    assert [t.name for t in tiers].count("small") == 2
    assert [t.name for t in tiers].count("large") == 6
    assert assign_tiers(validate(raw)) == tiers  # the same seed, the same devices
    reseeded = [assign_tiers(validate({**raw, "seed": s})) for s in range(1, 6)]
    assert any(t != tiers for t in reseeded)


def test_an_explicit_assignment_wins_and_no_tiers_means_unlimited(tiny_bert_dir):
    raw = tiny_raw(
        tiny_bert_dir,
        devices={**_tiers(("a", 10**9, 1), ("b", 10**10, 1)), "assignment": ["b", "a"]},
    )
    assert [t.name for t in assign_tiers(validate(raw))] == ["b", "a"]
    assert assign_tiers(validate(tiny_raw(tiny_bert_dir))) == [None, None]


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ({"assignment": ["x", "x"]}, "devices.assignment[0]: unknown tier 'x'"),
        ({**_tiers(("a", 1, 1), ("a", 2, 1))}, "tier names must be unique"),
        ({**_tiers(("a", 10**9, 1)), "assignment": ["a"]}, "expected one per client"),
        (
            {"tiers": [{"name": "a", "memory": "1GiB", "deadline_seconds": 5}]},
            "deadline_seconds needs flops",
        ),
        ({"tiers": [{"name": "a", "memory": "lots"}]}, "devices.tiers.0.memory"),
    ],
)
def test_bad_device_config_is_one_clear_error(tiny_bert_dir, devices, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(tiny_raw(tiny_bert_dir, devices=devices))


# ---- the cost model, by hand ------------------------------------------------------------

HAND = CostModel(
    num_experts=8,
    resident_bytes=1000,
    expert_resident_bytes=50,
    shared_train_bytes=100,
    expert_train_bytes=10,
    fused=False,
    activation_bytes=200,
    tokens_per_step=10,
    local_steps=2,
    forward_flops=4.0,
    backward_flops_none=6.0,
    backward_flops_all=10.0,
)


def test_cost_model_predicts_memory_and_flops_by_hand():
    cost = HAND.predict(4, flops_per_second=60.0)
    # 1000 resident + 3 x (100 shared + 4 x 10 expert) + 200 activations + 100 transient
    assert cost.peak_bytes == 1000 + 3 * 140 + 200 + 100 == 1720
    # tokens x (forward 4 + backward 6 + half of the experts' weight gradients 4 x 4/8)
    assert cost.step_flops == 10 * (4 + 6 + 2) == 120
    assert cost.round_seconds == 2 * 120 / 60 == 4.0
    assert HAND.predict(8).peak_bytes == 1720 + 4 * 30


def test_budget_is_the_most_experts_that_fit_memory_and_deadline():
    assert HAND.expert_budget(None) == 8
    assert HAND.expert_budget(DeviceTier(name="m", memory=1720)) == 4
    assert HAND.expert_budget(DeviceTier(name="m", memory=1749)) == 4
    assert HAND.expert_budget(DeviceTier(name="m", memory=1750)) == 5
    assert HAND.expert_budget(DeviceTier(name="m", memory=1599)) == -1  # not even the model
    # 5 experts: 2 steps x 10 x (4 + 6 + 4 x 5/8) = 250 FLOPs, 4.17 s at 60 FLOP/s
    slow = DeviceTier(name="s", memory=10**6, flops=60.0, deadline_seconds=4.0)
    assert HAND.expert_budget(slow) == 4


def test_fused_experts_cost_all_or_nothing():
    fused = replace(HAND, fused=True)
    assert fused.training_bytes(0) == 300
    assert fused.training_bytes(1) == fused.training_bytes(8) == 3 * (100 + 80)
    assert fused.expert_budget(DeviceTier(name="m", memory=1750)) == 0


def test_strict_mode_holds_only_its_experts():
    # 2 held experts: 6 unheld x 50 bytes are not resident
    assert HAND.predict(2, held=2).peak_bytes == HAND.predict(2).peak_bytes - 6 * 50
    # holding c experts: 600 + 50c resident + 3 x (100 + 10c) + 300 = 1200 + 80c
    assert HAND.expert_budget(DeviceTier(name="m", memory=1440), strict=True) == 3
    assert HAND.expert_budget(DeviceTier(name="m", memory=1519), strict=True) == 3
    assert HAND.expert_budget(DeviceTier(name="m", memory=1520), strict=True) == 4


def test_a_request_beyond_the_device_is_refused_with_the_numbers():
    tier = DeviceTier(name="phone", memory=1720)
    check_request(Price(HAND, 4), tier)
    check_request(Price(HAND, 8), None)
    with pytest.raises(BudgetExceeded, match=r"device 'phone' cannot train 8 experts.*budget is 4"):
        check_request(Price(HAND, 8), tier)
    # holding 2 of the 8 experts frees 6 x 50 bytes: training 4 then fits 1,420 bytes
    check_request(Price(HAND, 4, held=2), DeviceTier(name="phone", memory=1420))


def test_a_tier_too_small_for_one_expert_is_a_config_error(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir, devices=_tiers(("toaster", 1000, 1))))
    model = client_model(cfg, label_names(cfg))
    with pytest.raises(ConfigError, match=r"devices.tiers\[0\] \('toaster'\).*even 1 expert"):
        check_tiers(cfg, build_cost_model(model, cfg), ExpertModel(model).num_layers, False)


# ---- the cost model against measurements -----------------------------------------------
DEFAULT_MODEL = {"moe_layers": [3, 4, 5], "max_length": 64}  # configs/default.toml's model


def test_step_flops_match_what_torch_counts():
    """Counted with FlopCounterMode on the default model (attention scores are not in the
    prediction, and tokens spread unevenly over experts): within 8%."""
    cfg = validate({"model": DEFAULT_MODEL})
    model = client_model(cfg, label_names(cfg))
    costs = build_cost_model(model, cfg)
    batch = probe_batch(model, cfg)
    L, E = ExpertModel(model).shape
    gen = torch.Generator().manual_seed(0)
    for c in (0, L * E // 2, L * E):
        active = torch.zeros(L * E, dtype=torch.bool)
        active[torch.randperm(L * E, generator=gen)[:c]] = True
        counted = count_step_flops(model, batch, active.view(L, E))
        assert counted == pytest.approx(costs.predict(c).step_flops, rel=0.08)


def _graph_tensors() -> int:
    """Tensors alive with an autograd history (activations a graph still holds)."""
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some lazy modules' objects warns
        return sum(isinstance(o, torch.Tensor) and o.grad_fn is not None for o in gc.get_objects())


def test_measuring_a_model_leaves_nothing_of_its_probe_alive(tiny_bert_dir):
    """The probe's forward pass is measured with autograd's saved-tensor hooks; once the cost
    model is built, no tensor of that pass is alive (a saved output kept as it is would hold
    its own graph node: a cycle no collector frees, the whole pass resident for good)."""
    cfg = validate(tiny_raw(tiny_bert_dir))
    model = client_model(cfg, label_names(cfg))
    before = _graph_tensors()
    costs = build_cost_model(model, cfg)
    assert costs.activation_bytes > 0 and _graph_tensors() == before


MEASURE = """
import json, sys, torch
from hfedmoe.foundation.config import validate
from tests.support.calibration import measure_client_memory
torch.set_num_threads(2)
cfg = validate(json.loads(sys.argv[1]))
print(json.dumps(measure_client_memory(cfg, int(sys.argv[2]))))
"""


@pytest.mark.parametrize("experts", [6, pytest.param(24, marks=pytest.mark.slow)])  # CI time
def test_peak_memory_matches_the_prediction(experts):
    """Peak RSS of a fresh process training the default model (2 steps, batch 16 x 64)
    against the cost model: within 20% (measured 0.92-1.04 of the prediction, BUDGETS.md)."""
    raw = {"model": DEFAULT_MODEL, "train": {"local_steps": 2}}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(raw), str(experts)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],  # the repository root: tests.support imports
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    if m["measured_bytes"] is None:
        pytest.skip("peak RSS is not measurable on this platform")
    assert m["max_active_per_step"] == experts
    assert m["measured_bytes"] == pytest.approx(m["predicted_bytes"], rel=0.20)


def _small_device_client(algorithm: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE_SMALL_DEVICE, algorithm],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=None if env is None else {**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# FFT-MoE's prediction is also checked by the next test; its run here is slow (CI time).
@pytest.mark.parametrize("algorithm", ["flux", pytest.param("fftmoe", marks=pytest.mark.slow)])
def test_a_small_device_of_the_peers_holds_and_uses_what_the_cost_model_says(algorithm):
    """The default model on a device that fits little: FLUX holds merged experts in place of
    the ones it does not tune, FFT-MoE trains adapters on the frozen dense parent; the weights
    held are at most what the request was priced at (FLUX's floors in eq. (1) may merge fewer
    than B_non), and training's peak RSS is within 20% of its prediction (FLUX: 0.8-1.02
    measured here). FFT-MoE: a known miss, checked only to within 50%: its peak RSS was
    1.22-1.30x the prediction here at k = 1, 1.32x with other tests running. Its tensors need
    less than predicted (next test); glibc's heap keeps freed blocks resident
    (docs/BUDGETS.md)."""
    m = _small_device_client(algorithm)
    assert m["fits"] and m["budget"] >= 1
    assert m["held_bytes"] <= m["held_predicted_bytes"]
    if algorithm == "flux":
        assert m["budget"] == 4
        assert m["held_bytes"] < m["unmerged_bytes"]  # merged experts really replace originals
    if m["measured_bytes"] is None:
        pytest.skip("peak RSS is not measurable on this platform")
    tolerance = {"flux": 0.20, "fftmoe": 0.50}[algorithm]
    assert m["measured_bytes"] == pytest.approx(m["predicted_bytes"], rel=tolerance)


def test_fftmoe_fits_its_prediction_once_the_heap_returns_what_it_frees():
    """FFT-MoE's miss above is the allocator's, not the cost model's: with glibc's mmap
    threshold held at its initial 128 KiB (large blocks are returned when freed rather than
    kept in a fragmenting heap), the same client's peak is below the prediction (0.75 here;
    torch's profiler counts 219 MiB of live tensors at the peak against 310 predicted)."""
    m = _small_device_client("fftmoe", {"MALLOC_MMAP_THRESHOLD_": "131072"})
    if m["measured_bytes"] is None:
        pytest.skip("peak RSS is not measurable on this platform")
    assert m["measured_bytes"] <= m["predicted_bytes"]


# ---- budgets in a real federated run ----------------------------------------------------


def test_hfedmoe_keeps_every_client_within_its_budget(tiny_bert_dir, tmp_path):
    cfg = validate(three_tiers(tiny_bert_dir, "hfedmoe"))
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    records = read_metrics(tmp_path / "run")
    devices = {d["tier"]: d for d in records[0]["devices"]}
    assert {t: d["expert_budget"] for t, d in devices.items()} == {
        "small": 2,
        "medium": 5,
        "large": 8,
    }
    for record in records[1:]:
        assert record["clients_ok"] == 3 and record["clients_failed"] == 0
        assert 0 <= record["routing_consistency_mean"] <= 1  # eq. (18), reported
        for client in record["clients"]:
            budget = client["expert_budget"]
            assert client["requested_experts"] == budget
            assert 0 < client["max_active_per_step"] <= budget
            # the three participation sets: updated within routed; at most budget per batch
            assert client["experts_updated"] <= client["experts_routed"]
            assert client["experts_updated"] <= budget * cfg.train.local_steps
            assert max(client["expert_updates"]) <= cfg.train.local_steps
            if client["experts_updated"] < 8:  # experts it did not update stay home
                assert client["bytes_up"] < client["bytes_down"]
            assert client["memory_predicted_bytes"] > 0 and client["step_flops_predicted"] > 0


def test_budget_unaware_fedavg_loses_the_clients_that_cannot_hold_it(tiny_bert_dir, tmp_path):
    cfg = validate(three_tiers(tiny_bert_dir, "fedavg"))
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    records = read_metrics(tmp_path / "run")
    for record in records[1:]:
        assert record["clients_ok"] == 1 and record["clients_failed"] == 2
        assert record["failures"] == {"budget": 2}
        by_tier = {c["tier"]: c for c in record["clients"]}
        assert by_tier["large"]["status"] == "ok"
        for tier in ("small", "medium"):
            failed = by_tier[tier]
            assert failed["status"] == "failed" and failed["failure"] == "budget"
            assert failed["requested_experts"] == 8 and failed["bytes_up"] == 0
            assert "cannot train 8 experts per batch" in failed["error"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failure_rate"] == pytest.approx(2 / 3)


def test_a_round_where_every_client_fails_leaves_the_model_unchanged(tiny_bert_dir, tmp_path):
    raw = three_tiers(tiny_bert_dir, "fedavg")
    raw["devices"]["assignment"] = ["small", "small", "medium"]
    run_embedded(validate(raw), str(tmp_path / "run"), server_app, client_app)
    records = read_metrics(tmp_path / "run")
    assert all(r["clients_ok"] == 0 for r in records[1:])
    assert len({r["test_loss"] for r in records}) == 1  # the initial model, every round
