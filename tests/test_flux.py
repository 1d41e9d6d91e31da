"""FLUX (METHOD.md §9a): each step on hand-computed numbers, a merged model against the hand-merged
one, and a real run on three device tiers where the small devices hold merged experts."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfedmoe.algorithms import build_algorithm
from hfedmoe.algorithms.baselines.flux import (
    EXPLOIT_SHARE,
    EXPLORE,
    TUNE,
    Profile,
    TuneAndExplore,
    customised,
    merged_total,
    plan_merges,
    profile_experts,
    profile_roles,
)
from hfedmoe.algorithms.maths.flux import (
    assign_roles,
    cluster_experts,
    exploit_share,
    merge_budget,
    merge_weights,
    spsa_squared_norm,
    utility,
)
from hfedmoe.algorithms.mechanics.assignment import ASSIGNED
from hfedmoe.algorithms.mechanics.transfer import upload_weights
from hfedmoe.algorithms.messages import BUDGET, ClientUpdate
from hfedmoe.budget import CostModels
from hfedmoe.data.tokenized import padded_tokens
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.federation.workload import client_data, client_model, label_names
from hfedmoe.foundation.config import DeviceTier, validate
from hfedmoe.model import ExpertFFN, ExpertModel, MoEFeedForward
from hfedmoe.model.state import held_bytes
from hfedmoe.results import read_metrics

from .support.configs import tiny_raw
from .support.tiers import three_tiers

# ---- the maths, by hand --------------------------------------------------------------------


def test_utility_is_oort_style_by_hand():
    # |D^e| = 4 samples whose squared gradient norms sum to 16: 4 * sqrt(16 / 4) = 8
    u = utility(torch.tensor([4.0, 0.0, 1.0]), torch.tensor([16.0, 5.0, 9.0]))
    torch.testing.assert_close(u, torch.tensor([8.0, 0.0, 3.0], dtype=torch.float64))


def test_spsa_estimates_the_squared_gradient_norm():
    assert spsa_squared_norm(1.2, 1.0, 0.1) == pytest.approx(1.0)  # ((0.2) / 0.2)^2
    # over many directions z ~ N(0, I), (z . g)^2 averages to ||g||^2 = 25
    rng = np.random.default_rng(0)
    g = np.array([3.0, 4.0])
    sigma = 1e-3
    est = [
        spsa_squared_norm(float(g @ (sigma * z)), float(g @ (-sigma * z)), sigma)
        for z in rng.standard_normal((20000, 2))
    ]
    assert np.mean(est) == pytest.approx(25.0, rel=0.05)


def test_the_exploit_share_grows_to_its_maximum_at_half_the_rounds():
    shares = [exploit_share(r, 10, 0.3, 0.9) for r in range(1, 11)]
    assert shares[0] == pytest.approx(0.3)
    assert shares[2] == pytest.approx(0.3 + 0.6 * 2 / 5)
    assert shares[5] == pytest.approx(0.9)  # t = 5 = half of 10 rounds
    assert shares[-1] == pytest.approx(0.9)


def test_roles_exploit_the_best_and_explore_outside_e_i_by_hand():
    u = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    exploit, explore = assign_roles(u, b_tune=4, eps=0.5, rng=np.random.default_rng(0))
    assert exploit.nonzero().flatten().tolist() == [0, 1]  # the best half of E_i = {0,1,2,3}
    assert explore.nonzero().flatten().tolist() == [4, 5]  # the only 2 outside E_i


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 10), min_size=2, max_size=24),
    st.integers(1, 30),
    st.floats(0.05, 1.0),
    st.integers(0, 1000),
)
def test_roles_are_disjoint_and_fill_the_tuning_budget(u, b_tune, eps, seed):
    exploit, explore = assign_roles(torch.tensor(u), b_tune, eps, np.random.default_rng(seed))
    assert not (exploit & explore).any()
    assert int(exploit.sum()) >= 1
    assert int(exploit.sum() + explore.sum()) == min(b_tune, len(u))


def test_the_merge_budget_favours_shallow_and_evenly_used_layers_by_hand():
    # equal variances: b = (2, 1) / v, shares 2/3 and 1/3 of 6 merged experts
    f = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    assert merge_budget(f, 6) == [4, 2]
    # layer 0 used evenly (v = 0): b_0 = 2e8 against b_1 = 4, a share of 1 - 2e-8 of 4 floors
    # to 3; layer 1 still keeps one
    f = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert merge_budget(f, 4) == [3, 1]


def test_merge_weights_are_frequency_times_attention_by_hand():
    w = merge_weights(torch.tensor([0.2, 0.6]), torch.tensor([1.0, 0.5]))  # alpha = 0.2, 0.3
    torch.testing.assert_close(w, torch.tensor([0.4, 0.6], dtype=torch.float64))
    torch.testing.assert_close(
        merge_weights(torch.zeros(4), torch.ones(4)), torch.full((4,), 0.25, dtype=torch.float64)
    )


def test_clustering_groups_experts_by_cosine_direction():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    experts = torch.stack([a, 3 * a + 0.01, b, 0.5 * b, a + 0.02])  # scale does not matter
    labels = cluster_experts(experts, 2, components=4, iterations=20, seed=0)
    assert labels == [0, 0, 1, 1, 0]
    assert cluster_experts(experts, 5) == [0, 1, 2, 3, 4]  # k >= X: each its own
    assert cluster_experts(experts, 1) == [0] * 5


# ---- step 6: routing onto merged experts -----------------------------------------------------


def test_indices_sharing_a_merged_expert_sum_their_gate_weights():
    torch.manual_seed(0)
    experts = [ExpertFFN(4, 8, torch.nn.functional.gelu) for _ in range(3)]
    block = MoEFeedForward(experts, hidden=4, top_k=2)
    block.gate.weight.data.normal_()
    x = torch.randn(1, 5, 4)
    merged = experts[1]
    block.experts[2] = merged  # indices 1 and 2 now share one module
    with torch.no_grad():
        got = block(x).reshape(5, 4)
        x_NH = x.reshape(5, 4)
        probs = torch.softmax(x_NH @ block.gate.weight.T, -1)
        top, idx = probs.topk(2, -1)
        w = top / top.sum(-1, keepdim=True)
        want = torch.zeros(5, 4)
        for n in range(5):
            mine = {0: 0.0, 1: 0.0}  # module 0, or the merged one
            for j in range(2):
                mine[0 if int(idx[n, j]) == 0 else 1] += float(w[n, j])
            want[n] = mine[0] * experts[0](x_NH[n]) + mine[1] * merged(x_NH[n])
    torch.testing.assert_close(got, want)


# ---- steps 1, 4-7 on a real model --------------------------------------------------------------


def _model_and_data(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="flux"))
    return cfg, client_model(cfg, label_names(cfg)), client_data(cfg, 0, 2)


def test_profiling_counts_each_token_k_times_and_each_sample_once_per_expert(tiny_bert_dir):
    _, model, data = _model_and_data(tiny_bert_dir)
    profile = profile_experts(model, data, batch_size=16)
    L = ExpertModel(model).num_layers
    # every real token goes to top_k = 2 experts of each layer
    torch.testing.assert_close(profile.frequency.sum(1), torch.full((L,), 2.0, dtype=torch.float64))
    assert (profile.routed_samples <= len(data)).all() and (profile.routed_samples >= 0).all()
    assert float(profile.routed_samples.sum(1).min()) >= len(data) * 2  # >= k experts each
    assert (profile.attention > 0).all()  # eager attention gave real weights
    assert profile.attention.max() <= 1.0 + 1e-6  # a column mean of probabilities


def test_the_customised_model_holds_merged_experts_and_restores(tiny_bert_dir):
    _, model, _ = _model_and_data(tiny_bert_dir)
    em = ExpertModel(model)
    f = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    a = torch.tensor([[1.0, 1.0, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    profile = Profile(f, torch.ones(2, 4), a, 0)
    plan = {0: [[0], [1, 2, 3]], 1: [[2, 3]]}  # layer 0: expert 0 tuned; layer 1: 0, 1 tuned
    originals = [list(layer.block.experts) for layer in em.layers]
    before = held_bytes(model)
    with torch.no_grad():
        want = {
            name: (0.2 * p1 + 0.15 * p2 + 0.2 * p3) / 0.55
            for (name, p1), p2, p3 in zip(
                em.layers[0].block.experts[1].named_parameters(),
                em.layers[0].block.experts[2].parameters(),
                em.layers[0].block.experts[3].parameters(),
                strict=True,
            )
        }
    with customised(model, plan, profile, train_shared=False) as held:
        block = em.layers[0].block
        assert block.experts[1] is block.experts[2] is block.experts[3]
        for name, p in block.experts[1].named_parameters():
            torch.testing.assert_close(p, want[name])  # eq. (2) with alpha = f * a
        expert_bytes = sum(p.numel() * 4 for p in originals[0][0].parameters())
        assert held == before - 3 * expert_bytes  # 5 originals out, 2 merged in
        assert not any(p.requires_grad for p in em.layers[0].router.parameters())
        assert all(p.requires_grad for p in model.classifier.parameters())  # a new head trains
    assert [list(layer.block.experts) for layer in em.layers] == originals
    assert all(p.requires_grad for p in model.parameters())


def test_the_cost_model_predicts_what_a_flux_client_holds(tiny_bert_dir):
    cfg, model, data = _model_and_data(tiny_bert_dir)
    costs = CostModels(model, cfg).at()
    profile = profile_experts(model, data, batch_size=16)
    tuned = torch.zeros(2, 4, dtype=torch.bool)
    tuned[0, 0] = tuned[1, 1] = True
    plan = plan_merges(model, profile, tuned, b_non=2, cfg=cfg.flux, seed=0)
    assert all(len(clusters) == 1 for clusters in plan.values())  # one merged per layer
    with customised(model, plan, profile, train_shared=False) as held:
        assert held == costs.resident(2 + 2)  # 2 tuned + 2 merged experts resident
    assert held_bytes(model) == costs.resident()


def test_b_tune_and_b_non_come_from_the_device(tiny_bert_dir):
    cfg, model, _ = _model_and_data(tiny_bert_dir)
    algo = build_algorithm(cfg)
    costs = CostModels(model, cfg)
    c = costs.at(experts_only=True)  # routers and shared parameters do not train
    L, X = 2, c.num_experts
    assert algo.device_budget(costs, None) == X
    tier = DeviceTier(name="small", memory=c.predict(3, held=3 + L).peak_bytes)
    assert algo.device_budget(costs, tier) == 3  # 3 tuned and one merged per layer fit
    assert merged_total(c, tier, 3, L) == L  # nothing more fits
    roomy = DeviceTier(name="big", memory=c.predict(3).peak_bytes)
    assert merged_total(c, roomy, 3, L) == X - 3  # everything fits: nothing merged
    assert merged_total(c, None, 3, L) == X - 3


def test_the_server_keeps_each_clients_utilities(tiny_bert_dir):
    cfg, model, _ = _model_and_data(tiny_bert_dir)
    algo = build_algorithm(cfg)
    algo.bind(model)
    f = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3]])
    fresh = torch.zeros(2, 4)
    fresh[0, 0] = 1
    algo.remember(7, {"frequency": f, "fresh": fresh, "utility": torch.full((2, 4), 9.0)})
    want = f.double().clone()
    want[0, 0] = 9.0  # round 1: u = f_e, then the fresh estimate over it
    torch.testing.assert_close(algo.utilities[7], want)
    fresh2 = torch.zeros(2, 4)
    fresh2[1, 3] = 1
    algo.remember(7, {"frequency": f, "fresh": fresh2, "utility": torch.full((2, 4), 4.0)})
    want[1, 3] = 4.0  # the rest keeps its last utility
    torch.testing.assert_close(algo.utilities[7], want)
    algo.set_budgets({7: 4})
    request = algo.configure_client(1, {}, 7)
    assert len(request.config[ASSIGNED]) + len(request.config[EXPLORE]) == 4
    assert 0 in request.config[ASSIGNED]  # the best expert of client 7 is exploited


# ---- round 1: roles by f_e (METHOD.md §9a step 2) ---------------------------------------------

#: f_e of a client, (L=2, E=4); flat order by f_e: 0 (0.5), 6 (0.35), 1 (0.3), 7 (0.25), 4, 5, 2, 3
F_LE = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.2, 0.2, 0.35, 0.25]])


def _flux_algorithm(tiny_bert_dir, **flux):
    raw = tiny_raw(tiny_bert_dir, algorithm="flux", flux={"eps_0": 0.5, "eps_max": 0.5, **flux})
    cfg = validate(raw)
    model = client_model(cfg, label_names(cfg))
    algo = build_algorithm(cfg)
    algo.bind(model)
    algo.set_budgets({3: 4})
    return cfg, model, algo


def test_a_client_without_utilities_is_assigned_by_its_own_frequencies_by_hand(tiny_bert_dir):
    """|E_i| = 4, eps = 0.5: E_i = the top 4 by f_e = flat {0, 6, 1, 7}; its best 2, {0, 6},
    are exploited; 2 explore experts are drawn from the 4 outside E_i, {2, 3, 4, 5}."""
    _, _, algo = _flux_algorithm(tiny_bert_dir)
    config = algo.configure_client(1, {}, 3).config
    assert ASSIGNED not in config and EXPLORE not in config  # the client ranks its own f_e
    assert (config[TUNE], config[EXPLOIT_SHARE], config[BUDGET]) == (4, 0.5, 2)
    exploit, explore = profile_roles(config, F_LE)
    assert exploit.flatten().nonzero().flatten().tolist() == [0, 6]
    assert int(explore.sum()) == 2 and set(explore.flatten().nonzero().flatten().tolist()) <= {
        2,
        3,
        4,
        5,
    }
    _, _, drawn = _flux_algorithm(tiny_bert_dir, first_roles="draw")
    assert ASSIGNED in drawn.configure_client(1, {}, 3).config  # before: a seeded draw


def test_the_server_merges_only_the_exploit_experts_a_clients_own_frequencies_give(tiny_bert_dir):
    """A first-round client that updated (0, 0) and (0, 1): eq. (4) on the f_e it reports
    exploits (0, 0) and (1, 2) only, so (0, 1) keeps its global value; its table starts at f_e."""
    _, model, algo = _flux_algorithm(tiny_bert_dir)
    em = ExpertModel(model)
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    updated = torch.zeros(2, 4, dtype=torch.long)
    updated[0, 0] = updated[0, 1] = 1
    zeros = torch.zeros(2, 4)
    update = ClientUpdate(
        weights=upload_weights(model, updated > 0, em.expert_entries()),
        num_examples=10,
        stats={
            "expert_updates": updated,
            "routed_samples": torch.ones(2, 4),
            "utility": zeros,
            "fresh": zeros,
            "frequency": F_LE,
        },
    )
    new = algo.aggregate(1, glob, {3: update})
    for expert, moved in (((0, 0), True), ((0, 1), False)):
        for entry in em.expert_entries()[expert]:
            want = glob[entry.state_name] + (1.0 if moved else 0.0)
            torch.testing.assert_close(new[entry.state_name], want)
    torch.testing.assert_close(algo.utilities[3], F_LE.double())  # round 1: u = f_e


def _client_round(cfg, model, data, algo, weights, memory, server_round=1):
    request = algo.configure_client(server_round, weights, 3)
    request.memory = memory
    return request, algo.train_client(model, data, request, np.random.default_rng(0))


def _flip_first_router(weights):
    """The same weights with layer 0's router reversed, so that the routing changes."""
    name = next(n for n in weights if "router" in n or "gate" in n)
    return {**weights, name: -weights[name]}


@pytest.mark.parametrize("profiling", ["stale", "current"])
def test_stale_profiling_uses_the_previous_model_and_overlaps_the_new_pass(
    tiny_bert_dir, profiling
):
    """Two participations, the second with other weights. stale (METHOD.md §9a): the first
    ranks, merges and reports with the profile of the model it receives (nothing older exists),
    on the critical path; the second with that same profile, while the pass over its new model
    is kept for next time and counted as overlapping aggregation. current: each with its own,
    charged on the critical path. |E_i| = 1: no explore experts, so no probes."""
    cfg, model, algo = _flux_algorithm(tiny_bert_dir, profiling=profiling)
    algo.set_budgets({3: 1})
    data = client_data(cfg, 0, 2)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    second = _flip_first_router(first)
    profiles = []
    for weights in (first, second):
        load = model.load_state_dict(weights)
        assert not load.missing_keys
        profiles.append(profile_experts(model, data, cfg.eval.batch_size))
    assert not torch.equal(profiles[0].frequency, profiles[1].frequency)
    tokens = padded_tokens(data, cfg.eval.batch_size)
    memory: dict = {}
    request, update = _client_round(cfg, model, data, algo, first, memory)
    exploit, _ = profile_roles(request.config, update.stats["frequency"])
    assert ((update.stats["expert_updates"] > 0) <= exploit).all()  # its roles by its own f_e
    torch.testing.assert_close(update.stats["frequency"], profiles[0].frequency.float())
    assert update.metrics["forward_tokens"] == tokens and "overlapped_tokens" not in update.metrics
    algo.remember(3, update.stats)
    _, update = _client_round(cfg, model, data, algo, second, memory, server_round=2)
    if profiling == "stale":
        torch.testing.assert_close(update.stats["frequency"], profiles[0].frequency.float())
        torch.testing.assert_close(memory["profile/frequency"], profiles[1].frequency)
        assert update.metrics["forward_tokens"] == 0  # nothing besides training on the path
        assert update.metrics["overlapped_tokens"] == tokens
        assert update.metrics["overlapped_seconds"] > 0
    else:
        torch.testing.assert_close(update.stats["frequency"], profiles[1].frequency.float())
        assert not memory
        assert update.metrics["forward_tokens"] == tokens
        assert "overlapped_tokens" not in update.metrics


def test_train_shared_trains_uploads_and_averages_the_routers(tiny_bert_dir):
    """``train_shared``: the routers (and shared parameters) train, travel and are FedAvg'd by
    |D_i| (one client: its own values)."""
    cfg, model, algo = _flux_algorithm(tiny_bert_dir, train_shared=True)
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    request = algo.configure_client(1, glob, 3)
    update = algo.train_client(model, client_data(cfg, 0, 2), request, np.random.default_rng(0))
    routers = algo.layout.router_names
    assert set(routers) <= algo.upload_spec(model).required <= set(update.weights)
    assert all(not torch.equal(update.weights[n], glob[n]) for n in routers)
    new = algo.aggregate(1, glob, {3: update})
    for name in routers:
        torch.testing.assert_close(new[name], update.weights[name])


# ---- SPSA only from routed batches ----------------------------------------------------------


@pytest.mark.parametrize(("spsa_batches", "mean"), [("routed", 4.0), ("all", 2.0)])
def test_an_spsa_estimate_counts_only_batches_routed_to_the_expert_by_hand(
    tiny_bert_dir, spsa_batches, mean
):
    """One explore expert, (1, 2), and two batches: the first routed a token to it (its probe
    estimates 4), the second none (a probe would compare two equal losses: 0). Counting only
    routed batches, the estimate is the first batch's alone, 4; counting every batch, the
    zero drags it to (4 + 0) / 2 = 2."""
    _, model, _ = _model_and_data(tiny_bert_dir)
    explore = torch.zeros(2, 4, dtype=torch.bool)
    explore[1, 2] = True
    hooks = TuneAndExplore(
        model,
        torch.zeros(2, 4, dtype=torch.bool),
        explore,
        1e-3,
        np.random.default_rng(0),
        every_batch=spsa_batches == "all",
    )
    estimates = iter([4.0, 0.0])
    hooks._probe = lambda expert, batch: next(estimates)
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    for routed_to_it in (True, False):
        routed = torch.zeros(2, 4, dtype=torch.bool)
        routed[1, 2] = routed_to_it
        routed[0, 0] = True  # something else was routed
        hooks.select_experts(None, batch, routed)
        hooks.after_backward(torch.zeros(2, 4, dtype=torch.bool))
    assert float(hooks.grad_sq[1, 2] / hooks.batches[1, 2]) == pytest.approx(mean)
    assert hooks.probe_tokens == 2 * 10 * int(hooks.batches[1, 2])  # +-sigma: two passes each


def test_a_probe_of_an_expert_no_token_reached_is_an_exact_zero(tiny_bert_dir):
    """Why such a batch must not count: moving an expert no token was routed to leaves both
    losses equal, so the SPSA estimate is 0 whatever the expert's gradient. (Expert (1, 1) is
    kept from every token by routing among the others; without that, the same probe is not 0.)"""
    _, model, data = _model_and_data(tiny_bert_dir)
    em = ExpertModel(model)
    batch = data.batch(np.arange(4))
    explore = torch.zeros(2, 4, dtype=torch.bool)
    explore[1, 1] = True
    hooks = TuneAndExplore(
        model, torch.zeros_like(explore), explore, 1e-3, np.random.default_rng(0)
    )
    with em.restrict_routing(~explore):
        with torch.no_grad(), em.capture() as capture:
            model.eval()(**batch)
        assert not capture.routed(batch["attention_mask"])[1, 1]
        assert hooks._probe((1, 1), batch) == 0.0
    assert hooks._probe((1, 1), batch) > 0.0


# ---- a real federated run on three device tiers --------------------------------------------------


def _flux_tiers(tiny_bert_dir) -> dict:
    """Three clients: room to tune 2 experts (small) or 4 (medium) with one merged expert per
    layer, or everything (large)."""
    raw = three_tiers(tiny_bert_dir, "flux")
    cfg = validate(raw)
    costs = CostModels(client_model(cfg, label_names(cfg)), cfg).at(experts_only=True)
    for tier, b in zip(raw["devices"]["tiers"], (2, 4), strict=False):
        tier["memory"] = costs.predict(b, held=b + 2).peak_bytes
    return raw


def test_flux_stays_within_every_device_and_small_ones_hold_merged_experts(tiny_bert_dir, tmp_path):
    cfg = validate(_flux_tiers(tiny_bert_dir))
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    records = read_metrics(tmp_path / "run")
    merged_somewhere = False
    for record in records[1:]:
        assert record["clients_ok"] == 3 and record["clients_failed"] == 0
        for client in record["clients"]:
            assert client["max_active_per_step"] <= client["requested_experts"]
            assert 0 < client["requested_experts"] <= client["expert_budget"]
            assert client["expert_budget"] == {"small": 2, "medium": 4, "large": 8}[client["tier"]]
            # the weights held while training, measured, are what the cost model predicts
            assert client["memory_held_bytes"] == client["memory_held_predicted_bytes"]
            assert client["memory_held_bytes"] <= client["memory_unmerged_bytes"]
            if client["experts_merged"]:
                merged_somewhere = True
                assert client["memory_held_bytes"] < client["memory_unmerged_bytes"]
            assert client["usage_seconds"] > 0  # clustering and merging, at least
            if record["round"] == 1:  # a first participation profiles on the critical path
                assert client["extra_flops_predicted"] > 0
                assert "overlapped_flops_predicted" not in client
            else:  # stale profiling: this round's pass overlaps aggregation (METHOD.md §9a)
                assert client["overlapped_flops_predicted"] > 0
                assert client["overlapped_seconds"] > 0
        if record["round"] == 1:  # only tuned experts travel up
            small = next(c for c in record["clients"] if c["tier"] == "small")
            assert small["bytes_up"] < small["bytes_down"]
    assert merged_somewhere
    assert math.isfinite(records[-1]["test_loss"])


def test_a_decoder_client_profiles_attention_and_trains_with_merged_experts(tiny_llama_dir):
    raw = tiny_raw(tiny_llama_dir, algorithm="flux", model={"max_length": 48})
    raw["data"] = {
        "dataset": "qa_mix",
        "task": "multiple-choice",
        "max_examples_per_group": 30,
        "min_partition_size": 5,
    }
    cfg = validate(raw)
    model, data = client_model(cfg, label_names(cfg)), client_data(cfg, 0, 2)
    profile = profile_experts(model, data, batch_size=8)
    assert (profile.attention > 0).all() and (profile.attention < 1).any()  # real weights
    algo = build_algorithm(cfg)
    algo.bind(model)
    algo.set_budgets({0: 3})
    request = algo.configure_client(1, {k: v.clone() for k, v in model.state_dict().items()}, 0)
    small = DeviceTier(name="tiny", memory=1)  # nothing fits: one merged expert per layer
    request.device = small
    update = algo.train_client(model, data, request, np.random.default_rng(0))
    assert update.metrics["experts_merged"] >= 1
    assert update.metrics["memory_held_bytes"] < update.metrics["memory_unmerged_bytes"]


def test_identical_experts_are_grouped_evenly():
    same = torch.ones(5, 7)
    assert cluster_experts(same, 2) == [0, 1, 0, 1, 0]


def test_the_customised_model_computes_what_the_hand_merged_model_does(tiny_bert_dir):
    _, model, data = _model_and_data(tiny_bert_dir)
    em = ExpertModel(model)
    with torch.no_grad():  # experts that differ, as after training
        for layer in em.layers:
            for e, expert in enumerate(layer.block.experts):
                expert.fc_in.weight.add_(0.05 * e)
    profile = profile_experts(model, data, batch_size=16)
    plan = {0: [[0], [1, 3], [2]], 1: [[0, 1, 2, 3]]}
    hand = copy.deepcopy(model).eval()
    hand_em = ExpertModel(hand)
    with torch.no_grad():  # every member of a cluster gets the eq. (2) merge of its cluster
        for pos, clusters in plan.items():
            experts = hand_em.layers[pos].block.experts
            for cluster in clusters:
                w = merge_weights(profile.frequency[pos][cluster], profile.attention[pos][cluster])
                merged = {
                    n: sum(
                        float(w[i]) * dict(experts[e].named_parameters())[n]
                        for i, e in enumerate(cluster)
                    )
                    for n, _ in experts[cluster[0]].named_parameters()
                }
                for e in cluster:
                    for n, p in experts[e].named_parameters():
                        p.copy_(merged[n])
    batch = data.inputs(np.arange(8))
    model.eval()
    with customised(model, plan, profile, train_shared=False), torch.no_grad():
        got = model(**batch).logits
    with torch.no_grad():
        torch.testing.assert_close(got, hand(**batch).logits)
