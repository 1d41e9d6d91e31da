"""Bounded influence: what one client can do to the aggregate, by hand and in real runs.

The update bound is AdamW's own step size (``maths.bounds``), the share cap limits what
reported statistics can buy (``mechanics.merging``), the robust aggregators are coordinate-wise
(``maths.robust``), a client's weight is the size the server knows, and each attack of
``[faults]`` does what it should with the defences on and off.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from hfedmoe.algorithms import ClientUpdate, build_algorithm
from hfedmoe.algorithms.maths.bounds import (
    adamw_ratio_bound,
    adamw_update_bound,
    capped_mass,
    descent_cosine,
)
from hfedmoe.algorithms.maths.robust import coordinate_median, trim_count, trimmed_mean
from hfedmoe.algorithms.mechanics.merging import Merge, MergePolicy
from hfedmoe.algorithms.mechanics.uploads import UploadSpec
from hfedmoe.algorithms.mechanics.validation import Expectation, check_update
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation import wire
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import Admission
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.federation.strategy import AlgorithmStrategy, declared_size_cap
from hfedmoe.foundation.config import validate
from hfedmoe.foundation.errors import ConfigError, HFedMoEError
from hfedmoe.results import read_metrics

from .support.configs import tiny_raw

# --- the update bound: how far AdamW can move a weight -----------------------------------------


def test_adams_ratio_is_one_on_its_first_step_and_grows_slowly_by_hand():
    # t = 2: a = (0.1 x 0.9, 0.1) / 0.19, b = (0.001 x 0.999, 0.001) / 0.001999;
    # sum a^2 / b = 0.224377 / 0.499750 + 0.277008 / 0.500250 = 0.448979 + 0.553739 = 1.002718
    assert adamw_ratio_bound(1) == pytest.approx(1.0, abs=1e-12)
    assert adamw_ratio_bound(2) == pytest.approx(math.sqrt(1.002718), rel=1e-6)
    assert 1 < adamw_ratio_bound(5) < adamw_ratio_bound(20) < 1.2


def test_the_update_bound_by_hand():
    # lr 0.1, 4 coordinates, one step, no decay: 0.1 x sqrt(4) x 1, with 0.1% rounding slack
    exact = {"roundoff": 0.0}
    assert adamw_update_bound(0.1, 0.0, 1, 4, 123.0, **exact) == pytest.approx(0.2 * 1.001)
    # decay 0.5 at lr 0.1 over 2 steps shrinks w by 1 - 0.95^2 = 0.0975 of ||w|| = 10
    adam = 0.1 * 2 * (1 + adamw_ratio_bound(2))
    moved = adam + 0.975
    assert adamw_update_bound(0.1, 0.5, 2, 4, 10.0, **exact) == pytest.approx(moved * 1.001)
    # float32: each step may round each weight by 2^-24 of it, 2 x 2^-24 x (10 + moved) more
    rounded = moved + 2 * 2**-24 * (10.0 + moved)
    assert adamw_update_bound(0.1, 0.5, 2, 4, 10.0) == pytest.approx(rounded * 1.001, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.integers(1, 6),
    lr=st.floats(1e-5, 1e-1),
    wd=st.floats(0, 0.1),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(1e-3, 1e3),
)
def test_torch_adamw_never_moves_a_weight_beyond_the_bound(steps, lr, wd, seed, spread):
    """Whatever the gradients (any scale, any sign pattern), torch's AdamW with the default
    betas moves every coordinate by at most lr sum_t rho_t + (1 - (1 - lr wd)^T) |w_0|."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(64, generator=g, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=wd, eps=1e-8)
    for _ in range(steps):
        p.grad = torch.randn(64, generator=g, dtype=torch.float64) * spread ** torch.rand(
            64, generator=g, dtype=torch.float64
        )
        opt.step()
    moved = (p.detach() - w0).abs()
    adam = lr * sum(adamw_ratio_bound(t) for t in range(1, steps + 1))
    limit = adam + (1 - (1 - lr * wd) ** steps) * w0.abs()
    assert bool((moved <= limit * (1 + 1e-9)).all())


def test_the_bound_is_reached_by_the_gradients_cauchy_schwarz_names():
    """The bound is tight: gradients g_i proportional to a_i / b_i (two steps) move the weight
    by exactly lr (rho_1 + rho_2)."""
    b1, b2 = 0.9, 0.999
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=1.0, weight_decay=0.0, eps=0.0)
    # at step 2, a = ((1 - b1) b1, 1 - b1) / (1 - b1^2), b = ((1 - b2) b2, 1 - b2) / (1 - b2^2)
    ratios = [((1 - b1) * b1) / ((1 - b2) * b2), (1 - b1) / (1 - b2)]  # g_1, g_2 up to scale
    for grad in ratios:
        p.grad = torch.tensor([grad], dtype=torch.float64)
        opt.step()
    assert float(-p.detach()) == pytest.approx(
        adamw_ratio_bound(1) + adamw_ratio_bound(2), rel=1e-9
    )


GLOBAL = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[0.0, 0.0]])}
SPEC = UploadSpec(frozenset({"a", "b"}), groups={"a": [("a", None)], "b": [("b", None)]})


def _verdict(weights, clip=False, bound=lambda numel, norm: 0.1 * math.sqrt(numel)):
    update = ClientUpdate(weights, 5, metrics={"train_loss": 1.0, "steps": 1})
    return check_update(update, SPEC, GLOBAL, Expectation(1, bound=bound, clip=clip))


def test_each_group_is_bounded_on_its_own():
    # group b (2 coordinates) may move 0.1 x sqrt(2) = 0.141; it moves (0.1, 0.1) = 0.1414...
    inside = _verdict({"a": GLOBAL["a"], "b": torch.tensor([[0.099, 0.099]])})
    assert inside.rejection is None and inside.clipped == 0
    outside = _verdict({"a": GLOBAL["a"], "b": torch.tensor([[0.3, 0.4]])})  # moves 0.5
    assert outside.rejection.reason == "bound"
    assert "1 group(s)" in outside.rejection.detail and "b by 3.54 x" in outside.rejection.detail
    # the whole upload moves 0.5, 0.1 x its norm: within max_update_ratio, yet rejected


def test_clipping_pulls_a_group_back_to_its_bound_and_counts_it():
    sent = {"a": GLOBAL["a"], "b": torch.tensor([[0.3, 0.4]])}
    verdict = _verdict(sent, clip=True)
    assert verdict.rejection is None and verdict.clipped == 1
    b = verdict.update.weights["b"]
    assert float(b.norm()) == pytest.approx(0.1 * math.sqrt(2), rel=1e-6)
    assert torch.allclose(b / b.norm(), torch.tensor([[0.6, 0.8]]))  # the same direction
    assert torch.equal(sent["b"], torch.tensor([[0.3, 0.4]]))  # the reply is not written
    assert verdict.update.weights["a"] is sent["a"]  # a group within its bound is untouched


# --- the descent check: a direction against the server's validation loss -------------------

#: the validation loss's gradient at GLOBAL: it falls fastest along a's first coordinate
GRADIENT = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[0.0, 0.0]])}


def _descended(weights, clip=False, least=0.0):
    update = ClientUpdate(weights, 5, metrics={"train_loss": 1.0, "steps": 1})
    expect = Expectation(
        1,
        bound=lambda numel, norm: 0.1 * math.sqrt(numel),
        clip=clip,
        descent=GRADIENT,
        min_descent_cosine=least,
    )
    return check_update(update, SPEC, GLOBAL, expect)


def test_the_descent_cosine_by_hand():
    assert descent_cosine(-3.0, 1.0, 5.0) == pytest.approx(0.6)  # -<d, g> / (|d| |g|)
    assert descent_cosine(3.0, 1.0, 5.0) == pytest.approx(-0.6)
    assert descent_cosine(1.0, 0.0, 5.0) == 0.0 == descent_cosine(1.0, 1.0, 0.0)


def test_an_update_that_points_uphill_is_rejected_and_its_sign_flip_accepted():
    # a moves by (-0.03, 0.04): cos with -g = 0.03 / 0.05 = 0.6; its sign flip: -0.6
    downhill = _descended({"a": torch.tensor([2.97, 4.04]), "b": GLOBAL["b"]})
    assert downhill.rejection is None and downhill.descent_cosine == pytest.approx(0.6)
    uphill = _descended({"a": torch.tensor([3.03, 3.96]), "b": GLOBAL["b"]})
    assert uphill.rejection.reason == "descent" and uphill.descent_cosine == pytest.approx(-0.6)
    assert "-0.6 (least accepted 0)" in uphill.rejection.detail
    assert _descended({"a": torch.tensor([2.97, 4.04]), "b": GLOBAL["b"]}, least=0.7).rejection


def test_the_descent_check_counts_a_clipped_group_as_it_is_accepted():
    # b moves by (0.3, 0.4), clipped to 0.1 sqrt(2) = 0.1414; the gradient is 0 on b, so the
    # accepted update's cosine is 0.03 / sqrt(0.05^2 + 0.02) = 0.03 / 0.15 = 0.2
    sent = {"a": torch.tensor([2.97, 4.04]), "b": torch.tensor([[0.3, 0.4]])}
    verdict = _descended(sent, clip=True)
    assert verdict.clipped == 1 and verdict.descent_cosine == pytest.approx(0.2, rel=1e-5)


def test_a_fused_experts_upload_is_checked_against_its_slice_of_the_gradient():
    """A partial upload names an expert of a fused (E, ...) tensor by its own key; its
    reference gradient is that expert's row of the parameter's gradient. Expert 1 moves
    against the gradient's row 1 (cosine 1), the router by as much along it (-1): 0 in all."""
    from hfedmoe.model.experts import ExpertEntry

    fused = {"w": torch.ones(2, 2), "router": torch.ones(2)}
    row1 = ExpertEntry("w", dim=0, index=torch.tensor([1]))
    spec = UploadSpec(
        frozenset({"router"}),
        experts={"w@expert0.1": ("w", row1)},
        groups={"expert 0.1": [("w@expert0.1", None)], "router 0": [("router", None)]},
    )
    gradient = {"w": torch.tensor([[5.0, 5.0], [3.0, 4.0]]), "router": torch.tensor([0.6, 0.8])}
    sent = {"w@expert0.1": torch.tensor([[0.97, 0.96]]), "router": torch.tensor([1.03, 1.04])}
    update = ClientUpdate(sent, 5, metrics={"train_loss": 1.0, "steps": 1})
    verdict = check_update(update, spec, fused, Expectation(1, descent=gradient))
    # <delta, g> = -(0.09 + 0.16) + (0.018 + 0.032) = -0.2; |delta| = 0.05 sqrt(2); |g| over
    # the uploaded parts = sqrt(25 + 1) : cos = 0.2 / (0.0707 x 5.099) = 0.5547
    assert verdict.rejection is None
    assert verdict.descent_cosine == pytest.approx(0.2 / (0.05 * math.sqrt(2) * math.sqrt(26)))
    # a part no validation token reached has no gradient: its move still counts in |delta|
    no_router = {"w": gradient["w"]}
    verdict = check_update(update, spec, fused, Expectation(1, descent=no_router))
    assert verdict.descent_cosine == pytest.approx(0.25 / (0.05 * math.sqrt(2) * 5.0))


def test_a_gradient_that_is_not_finite_gives_no_direction_and_accepts_nothing():
    assert math.isnan(descent_cosine(math.nan, 1.0, 1.0))
    nan = {"a": torch.tensor([math.nan, 0.0]), "b": GRADIENT["b"]}
    update = ClientUpdate(
        {"a": torch.tensor([2.97, 4.04]), "b": GLOBAL["b"]}, 5, {"train_loss": 1.0, "steps": 1}
    )
    verdict = check_update(update, SPEC, GLOBAL, Expectation(1, descent=nan))
    assert verdict.rejection.reason == "descent"


def test_the_descent_check_needs_a_validation_split(tiny_bert_dir):
    raw = tiny_raw(tiny_bert_dir, federation={"descent_check": True})
    with pytest.raises(ConfigError, match=r"descent_check: .* data\.validation_fraction > 0"):
        validate(raw)


def test_the_descent_check_refuses_noise_that_hides_the_direction(tiny_bert_dir):
    raw = tiny_raw(
        tiny_bert_dir,
        federation={"descent_check": True},
        data={"validation_fraction": 0.2},
        privacy={"enabled": True, "noise": "client", "noise_multiplier": 1.0, "clip_norm": 0.5},
    )
    with pytest.raises(ConfigError, match=r"descent_check: .* expected privacy\.noise = 'server'"):
        validate(raw)


# --- what a client's weight may be ---------------------------------------------------------


def test_a_reply_must_state_the_examples_the_server_knows():
    update = ClientUpdate(dict(GLOBAL), 10**12, metrics={"train_loss": 1.0, "steps": 1})
    rejection = check_update(update, SPEC, GLOBAL, Expectation(1, examples=40)).rejection
    assert rejection.reason == "examples" and "expected 40" in rejection.detail
    update.num_examples = 40
    assert check_update(update, SPEC, GLOBAL, Expectation(1, examples=40)).rejection is None


@pytest.mark.parametrize(
    ("federation", "liar"),
    [
        ({}, 4 * 110),  # by default: 4 x the median declared size (of 100 and 120)
        ({"max_examples_per_client": 150}, 150),  # the operator's own cap
        ({"defences": False}, 2**62),  # trusted: what it declares
    ],
)
def test_a_declared_size_carries_a_capped_weight(tiny_bert_dir, federation, liar):
    # own data on a deployment: each node declares its size, which the server cannot check
    cfg = validate(tiny_raw(tiny_bert_dir, federation={"num_clients": 4, **federation}))
    strategy = AlgorithmStrategy(build_algorithm(cfg), cfg)
    sizes = [90, 100, 120, 2**62]
    devices = {100 + c: wire.DeviceReport(c, "", 0, 24, 24, 4, n) for c, n in enumerate(sizes)}
    strategy.set_devices(devices, None)
    assert strategy.weights == {0: 90, 1: 100, 2: 120, 3: liar}
    assert strategy.examples[3] == 2**62  # what its replies must state is what it declared
    # where the server made the partitions, it knows every size, and no default cap applies
    strategy.set_devices(devices, [90, 100, 120, 1000])
    assert strategy.weights[3] == (150 if "max_examples_per_client" in federation else 1000)


def test_declared_size_cap_by_hand():
    assert declared_size_cap([10, 20, 30]) == 80
    assert declared_size_cap([1, 1, 10**9]) == 4  # one liar cannot move the median
    assert declared_size_cap([0]) == 1


def test_the_share_cap_by_hand():
    # m' / (m' + others) <= share: 3 against 1 at share 1/2 keeps 1; a sole client keeps all
    assert capped_mass(3.0, 1.0, 0.5) == 1.0
    assert capped_mass(3.0, 0.0, 0.5) == 3.0
    assert capped_mass(0.5, 1.0, 0.5) == 0.5
    assert capped_mass(9.0, 1.0, 0.9) == pytest.approx(9.0)


def _merge(masses, examples, values, policy, reported=True):
    merge = Merge({"r": torch.tensor([0.0])}, policy=policy)
    for m, n, x in zip(masses, examples, values, strict=True):
        merge.add("r", torch.tensor([float(x)]), m, examples=n if reported else None)
    return float(merge.finish()["r"]), merge.counts


def test_reported_statistics_buy_a_client_at_most_the_cap():
    """Masses 6, 1, 1 (values 1, 0, 0), equal data: uncapped, the first client holds 6/8; with
    a cap of 1/2 its mass becomes 2 (2 / (2 + 2)), so the mean is 1/2."""
    cap = MergePolicy(max_client_share=0.5)
    assert _merge([6, 1, 1], [10, 10, 10], [1, 0, 0], MergePolicy())[0] == 0.75
    value, counts = _merge([6, 1, 1], [10, 10, 10], [1, 0, 0], cap)
    assert value == pytest.approx(0.5) and counts["share_capped"] == 1
    # its own data (30 of 50) entitles it to 0.6: mass 0.6 x 2 / 0.4 = 3, the mean 3/5
    assert _merge([6, 1, 1], [30, 10, 10], [1, 0, 0], cap)[0] == pytest.approx(0.6)
    # masses of |D_c| x yes-or-no are the data shares: never capped
    assert _merge([6, 1, 1], [10, 10, 10], [1, 0, 0], cap, reported=False)[0] == 0.75
    # a sole contributor is its key's whole weight, as before
    assert _merge([6], [10], [1], cap)[0] == 1.0


def test_the_robust_aggregators_by_hand():
    x = torch.tensor([[1.0, -5.0], [2.0, 0.0], [100.0, 1.0], [3.0, 2.0]])
    assert torch.equal(coordinate_median(x), torch.tensor([2.5, 0.5], dtype=torch.float64))
    assert trim_count(4, 0.25) == 1 and trim_count(3, 0.25) == 0 and trim_count(10, 0.45) == 4
    # drop the largest and smallest of each column: (2, 3) and (0, 1)
    assert torch.equal(trimmed_mean(x, 0.25), torch.tensor([2.5, 0.5], dtype=torch.float64))


def test_a_robust_merge_outvotes_one_extreme_reply_and_falls_back_when_sparse():
    policy = MergePolicy(robust="median")
    merge = Merge({"w": torch.zeros(1), "e": torch.zeros(1)}, policy=policy)
    for x, n in ((1.0, 10), (2.0, 10), (1000.0, 10**6)):
        merge.add("w", torch.tensor([x]), n)
    for x in (1.0, 3.0):  # an expert with two holders: the weighted mean
        merge.add("e", torch.tensor([x]), 10)
    out = merge.finish()
    assert float(out["w"]) == 2.0 and float(out["e"]) == 2.0
    assert merge.counts == {"share_capped": 0, "robust_fallback": 1}


def test_robust_aggregation_rejects_eq_20_as_written(tiny_bert_dir):
    raw = tiny_raw(tiny_bert_dir, algorithm="hfedmoe", hfedmoe={"router_alpha": "as_written"})
    raw["federation"]["robust"] = "median"
    with pytest.raises(ConfigError, match=r"federation\.robust"):
        validate(raw)


# --- who takes part: the budget query --------------------------------------------------------


def _device(**changes) -> wire.DeviceReport:
    values = {"partition_id": 1, "tier": "phone", "memory_bytes": 2**30, "expert_budget": 4}
    values |= {"num_experts": 24, "num_partitions": 8, "num_examples": 50}
    return wire.DeviceReport(**{**values, **changes})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, None),
        ({"num_experts": 12}, "reports 12 experts; the model has 24"),
        ({"num_partitions": 4}, "num-partitions is 4"),
        ({"partition_id": 8}, "partition 8 is not a client"),
        ({"expert_budget": 0}, "cannot train even 1 expert(s)"),
        ({"num_examples": 5000}, "declares 5000 examples; its partition has 50"),
    ],
)
def test_a_node_is_left_out_for_what_its_budget_reply_says(changes, reason):
    admission = Admission(1, 24, 8, known_examples=(70, 50, 30, 1, 1, 1, 1, 1))
    refused = admission.refuse(_device(**changes))
    assert refused is None if reason is None else reason in refused


def test_without_known_sizes_a_node_must_declare_its_own():
    admission = Admission(1, 24, 8)
    assert admission.refuse(_device(num_examples=0)) == "declares no training examples"
    assert admission.refuse(_device(num_examples=7)) is None


@pytest.mark.parametrize(
    "record",
    [
        {"partition_id": "1"},
        {"partition_id": True},
        {"expert_budget": -2},
        {"tier": 7},
        {"surprise": 1},
    ],
)
def test_a_malformed_budget_reply_names_the_field(record):
    from flwr.app import ConfigRecord, RecordDict

    values = {**asdict(_device()), **record}
    with pytest.raises(ValueError, match="malformed budget reply"):
        wire.unpack_device(RecordDict({wire.DEVICE: ConfigRecord(values)}))


# --- attacks in real runs ----------------------------------------------------------------------


def _attacked(tiny_bert_dir, tmp_path, attack, algorithm="fedavg", defences=True):
    """One round of 3 clients, client 1 attacking: its metrics and final weights."""
    raw = tiny_raw(
        tiny_bert_dir,
        algorithm=algorithm,
        federation={"num_clients": 3, "clients_per_round": 3, "rounds": 1, "defences": defences},
    )
    raw["faults"] = {"attackers": [1], "attack": attack}
    run_dir = tmp_path / f"{algorithm}-{attack}-{defences}"
    run_embedded(validate(raw), str(run_dir), server_app, client_app)
    return read_metrics(run_dir), load_file(run_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def absent(tiny_bert_dir, tmp_path_factory):
    """The run in which the attacker simply takes no part."""
    return _attacked(tiny_bert_dir, tmp_path_factory.mktemp("absent"), "dropout")


#: attack -> (defences on, defences off): the attacker's fate, "ok" or the failure reason
ATTACKS = {
    "inflate-examples": ("examples", "ok"),
    "sign-flip": ("ok", "ok"),  # as large as an honest update: no size bound can tell
    "scale-update": ("bound", "ok"),
    "noise": ("bound", "ok"),
    "inflate-stats": ("ok", "ok"),  # FedAvg reads no statistic but its update counts
    "inf-metric": ("metrics", "metrics"),  # validation, not a defence: never off
}


@pytest.mark.parametrize("defences", [True, False])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_attack_with_the_defences_on_and_off(
    tiny_bert_dir, tmp_path, absent, attack, defences
):
    """A rejected attacker leaves exactly the model of the run in which it took no part; an
    accepted one reaches the model."""
    metrics, model = _attacked(tiny_bert_dir, tmp_path, attack, defences=defences)
    fate = ATTACKS[attack][0 if defences else 1]
    attacker = next(c for c in metrics[1]["clients"] if c["partition_id"] == 1)
    assert (attacker["failure"] or "ok") == fate
    unchanged = all(torch.equal(model[k], absent[1][k]) for k in model)
    assert unchanged == (fate != "ok")
    assert metrics[1]["clients_ok"] == 2 + (fate == "ok")


def test_a_sign_flip_points_exactly_against_its_honest_update(tiny_bert_dir, tmp_path):
    """The descent check in a real run: the server's reference gradient on its validation
    split gives each reply a cosine, an update below 0 is rejected (``descent``), and the
    attacker's sign flip has its honest update's cosine negated, so exactly one of the two
    is accepted. (On this random tiny model some honest updates point uphill too: their
    label-skewed steps move the class prior away from the validation split's.)"""
    checked = {"descent_check": True, "num_clients": 3, "clients_per_round": 3, "rounds": 1}
    rows = {}
    for attack in ("none", "sign-flip"):
        raw = tiny_raw(tiny_bert_dir, federation=checked, data={"validation_fraction": 0.2})
        raw["faults"] = {"attackers": [] if attack == "none" else [1], "attack": "sign-flip"}
        run_embedded(validate(raw), str(tmp_path / attack), server_app, client_app)
        rows[attack] = {c["partition_id"]: c for c in read_metrics(tmp_path / attack)[1]["clients"]}
    assert read_metrics(tmp_path / "none")[1]["descent_seconds"] > 0
    honest, flipped = rows["none"][1]["descent_cosine"], rows["sign-flip"][1]["descent_cosine"]
    assert flipped == pytest.approx(-honest, rel=1e-4) and honest != 0
    for clients in rows.values():
        for c in clients.values():
            assert (c["failure"] == "descent") == (c["descent_cosine"] < 0)


def test_inflated_statistics_pass_validation_and_the_share_cap_holds_them(tiny_bert_dir, tmp_path):
    """HFedMoE: u_c spread evenly (each layer sums to 1) and s_c = 1 everywhere make its
    router mass the largest possible, which the share cap limits to 1/2 per router."""
    metrics, _ = _attacked(tiny_bert_dir, tmp_path, "inflate-stats", algorithm="hfedmoe")
    assert metrics[1]["clients_ok"] == 3
    assert metrics[1]["share_capped"] > 0
    undefended, _ = _attacked(
        tiny_bert_dir, tmp_path, "inflate-stats", algorithm="hfedmoe", defences=False
    )
    assert undefended[1]["clients_ok"] == 3 and undefended[1]["share_capped"] == 0


def test_a_node_with_a_broken_budget_reply_is_left_out_and_the_run_goes_on(tiny_bert_dir, tmp_path):
    """Node 1's answer to the budget query is not a device report: it is left out with its
    reason, never sampled, and the other two train every round."""
    from flwr.app import ConfigRecord, Message, RecordDict

    def broken_budget(msg: Message, context):
        if (
            msg.metadata.message_type == wire.BUDGET_QUERY
            and context.node_config["partition-id"] == 1
        ):
            return Message(RecordDict({wire.DEVICE: ConfigRecord({"tier": 7})}), reply_to=msg)
        return client_app(msg, context)

    raw = tiny_raw(tiny_bert_dir, federation={"num_clients": 3, "clients_per_round": 2})
    run_dir = tmp_path / "run"
    run_embedded(validate(raw), str(run_dir), server_app, broken_budget)
    metrics = read_metrics(run_dir)
    [excluded] = metrics[0]["excluded"]
    assert "malformed budget reply" in excluded["reason"]
    assert [d["partition_id"] for d in metrics[0]["devices"]] == [0, 2]
    for record in metrics[1:]:
        assert sorted(c["partition_id"] for c in record["clients"]) == [0, 2]
        assert record["clients_ok"] == 2


def test_too_few_nodes_left_is_one_clear_error(tiny_bert_dir, tmp_path):
    from flwr.app import Error, Message

    def refusing(msg: Message, context):
        if msg.metadata.message_type == wire.BUDGET_QUERY and context.node_config["partition-id"]:
            return Message(Error(code=1, reason="no"), reply_to=msg)
        return client_app(msg, context)

    raw = tiny_raw(tiny_bert_dir, federation={"num_clients": 3, "clients_per_round": 2})
    with pytest.raises(HFedMoEError, match=r"2 nodes needed, 1 can take part"):
        run_embedded(validate(raw), str(tmp_path / "run"), server_app, refusing)
