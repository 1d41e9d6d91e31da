"""The baselines of METHOD.md §9: Random subset, FedMoE and the four HFedMoE ablations, each on
the same interfaces, within the same device budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hfedmoe.algorithms import ALGORITHMS, ClientUpdate, build_algorithm
from hfedmoe.algorithms.baselines.flexmoe import assign
from hfedmoe.algorithms.baselines.random_subset import draw_experts
from hfedmoe.algorithms.mechanics.assignment import ASSIGNED, STRICT
from hfedmoe.algorithms.mechanics.merging import Merge
from hfedmoe.algorithms.mechanics.transfer import upload_weights
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.federation.workload import server_workload
from hfedmoe.foundation.config import validate
from hfedmoe.model import ExpertModel, load_checkpoint
from hfedmoe.results import read_metrics

from .support.configs import tiny_raw
from .support.tiers import three_tiers

BASELINES = ["random", "fedmoe", "flexmoe"]
ABLATIONS = {
    "hfedmoe-rank-s": ("ranking", "importance"),
    "hfedmoe-lambda1": ("lam", 1.0),
    "hfedmoe-holder-avg": ("expert_aggregation", "holders"),
    "hfedmoe-fedavg-routers": ("router_aggregation", "fedavg"),
}
VARIANTS = {"hfedmoe-batch-usage": ("usage_over", "batches")}  # named variants, variants.py


def test_every_method_of_the_comparison_is_registered():
    assert {"fedavg", "hfedmoe", *BASELINES, *ABLATIONS, *VARIANTS} <= set(ALGORITHMS)


# ---- Random subset ----------------------------------------------------------------------


def test_random_draw_has_the_budget_and_depends_on_the_seed():
    draws = [draw_experts((3, 8), 5, np.random.default_rng(s)) for s in range(20)]
    assert all(d.shape == (3, 8) and int(d.sum()) == 5 for d in draws)
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 15
    assert int(draw_experts((3, 8), 99, np.random.default_rng(0)).sum()) == 24


# ---- FedMoE -----------------------------------------------------------------------------


def test_router_rows_follow_their_experts_holders_by_hand():
    old = torch.zeros(3, 2)
    a, b = torch.ones(3, 2), 3 * torch.ones(3, 2)
    held = torch.tensor([[True, False, False], [True, True, False]])  # (C, E)
    merge = Merge({"router": old})
    for x, n, held_E in zip([a, b], [10, 30], held, strict=True):  # one reply at a time
        merge.add_rows("router", x, (n * held_E).tolist())
    rows = merge.finish()["router"]
    torch.testing.assert_close(rows[0], torch.full((2,), 0.25 * 1 + 0.75 * 3))  # both held it
    torch.testing.assert_close(rows[1], torch.full((2,), 3.0))  # only the second client
    torch.testing.assert_close(rows[2], torch.zeros(2))  # nobody: unchanged


def test_fedmoe_sub_moe_mixes_own_pattern_and_the_recommendation(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="fedmoe"))
    algo = build_algorithm(cfg)
    algo.bind(server_workload(cfg).model)
    L, E = algo.layout.shape
    assert (L, E) == (2, 4)
    algo.usage = {
        7: torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]]),
        8: torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.7, 0.1, 0.1, 0.1]]),
    }
    algo.examples = {7: 30, 8: 10}
    # u_global = 0.75 u_7 + 0.25 u_8; score_7 = 0.5 u_7 + 0.5 u_global = 0.875 u_7 + 0.125 u_8
    # layer 0: [.45, .275, .1, .175]; layer 1: [.175, .1, .1875, .5375]
    held = algo.sub_moe(1, 7, budget=3)
    assert held.nonzero().tolist() == [[0, 0], [0, 1], [1, 3]]
    new_client = algo.sub_moe(1, 99, budget=2)  # no pattern yet: the recommendation
    # u_global: layer 0 [.4, .25, .1, .25] -> 0; layer 1 [.25, .1, .175, .475] -> 3
    assert new_client.nonzero().tolist() == [[0, 0], [1, 3]]
    algo.set_budgets({7: 3})
    task = algo.configure_client(1, server_workload(cfg).model.state_dict(), 7)
    assert task.config[STRICT] == 1 and len(task.config[ASSIGNED]) == 3


# ---- FLEX-MoE ---------------------------------------------------------------------------


def test_flex_assignment_covers_every_expert_then_follows_fitness_by_hand():
    fitness = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0],  # client 0
            [0.7, 0.6, 0.5, 0.2],  # client 1
        ]
    )
    # pass 1 (experts by best fitness: 0, 1, 2, 3): 0 -> c0, 1 -> c0, 2 -> c1, 3 -> c1
    # pass 2: one slot left for c1; cap = ceil(5/4) + 1 = 3; best free pair is (c1, e0)
    got = assign(fitness, [2, 3])
    assert got.tolist() == [[True, True, False, False], [True, False, True, True]]
    # too few slots to cover everything: the experts with the best fitness go first
    assert assign(fitness, [1, 1]).tolist() == [
        [True, False, False, False],
        [False, True, False, False],
    ]


def test_flexmoe_keeps_routers_personal(tiny_bert_dir, tmp_path):
    cfg = validate(three_tiers(tiny_bert_dir, "flexmoe"))
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    from hfedmoe.model import load_checkpoint

    final, _ = load_checkpoint(tmp_path / "run" / "model")
    initial = server_workload(cfg).model
    layout_names = ExpertModel(initial).param_groups()["routers"]
    final_params, initial_params = dict(final.named_parameters()), dict(initial.named_parameters())
    for name in layout_names:  # the global router is never aggregated
        torch.testing.assert_close(final_params[name], initial_params[name])


def test_a_flexmoe_client_trains_its_own_router_and_never_uploads_it(tiny_bert_dir):
    from hfedmoe.algorithms.baselines.flexmoe import ROUTER_MEMORY
    from hfedmoe.federation.workload import client_data

    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="flexmoe"))
    model = server_workload(cfg).model
    algo = build_algorithm(cfg)
    algo.bind(model)
    routers = algo.layout.router_names
    task = algo.configure_client(1, {k: v.clone() for k, v in model.state_dict().items()}, 5)
    mine = {ROUTER_MEMORY + n: torch.full_like(model.state_dict()[n], 0.5) for n in routers}
    task.memory = dict(mine)
    update = algo.train_client(model, client_data(cfg, 0, 2), task, np.random.default_rng(0))
    assert not set(routers) & set(update.weights)
    for key, before in mine.items():  # it started from its own router and trained it
        after = task.memory[key]
        assert not torch.equal(after, before) and (after - before).abs().max() < 0.1


def test_a_flexmoe_clients_personal_model_is_the_global_one_with_its_own_routers(tiny_bert_dir):
    """The state a node keeps (its routers) turns the global weights into its personal model;
    a node that keeps nothing yet has the global model (no tensor replaced), and an algorithm
    without personal models says so (None)."""
    from hfedmoe.algorithms.baselines.flexmoe import ROUTER_MEMORY
    from hfedmoe.model.state import shared_state

    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="flexmoe"))
    model = server_workload(cfg).model
    algo = build_algorithm(cfg)
    algo.bind(model)
    glob = shared_state(model)
    routers = algo.layout.router_names
    memory = {ROUTER_MEMORY + n: torch.full_like(glob[n], 0.5) for n in routers}
    mine = algo.personal_weights(glob, memory)
    assert set(mine) == set(routers)
    assert all(torch.equal(mine[n], memory[ROUTER_MEMORY + n]) for n in routers)
    assert algo.personal_weights(glob, {}) == {}
    hfedmoe = build_algorithm(validate(tiny_raw(tiny_bert_dir, algorithm="hfedmoe")))
    assert hfedmoe.personal_weights(glob, memory) is None


def test_flexmoe_records_each_clients_personal_model_beside_the_global_one(
    tiny_bert_dir, tmp_path, monkeypatch
):
    """Beside the global model's per-client accuracy, the server records each client's personal
    model's (the final global weights with the routers its node keeps) on its own
    distribution's test data: what evaluating that model on the whole test split, reweighted
    to the client (``hfedmoe.training.personal``), gives. Before anyone trains they are the
    global model's."""
    import hfedmoe.engines.embedded as embedded
    from hfedmoe.federation import wire
    from hfedmoe.model.state import shared_state, swapped_in
    from hfedmoe.training import evaluate
    from hfedmoe.training.personal import personalised

    grids = []

    class KeptGrid(embedded.EmbeddedGrid):  # to read the nodes' state after the run
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            grids.append(self)

    monkeypatch.setattr(embedded, "EmbeddedGrid", KeptGrid)
    cfg = validate(three_tiers(tiny_bert_dir, "flexmoe"))
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    records = read_metrics(tmp_path / "run")
    assert records[0]["personal_model_accuracy"] == records[0]["personal_accuracy"]
    last = records[-1]
    final, _ = load_checkpoint(tmp_path / "run" / "model")
    workload = server_workload(cfg)
    algo = build_algorithm(cfg)
    algo.bind(final)
    states = grids[0].node_states()
    rows = {row["partition_id"]: row for row in last["clients"]}
    for client in range(cfg.federation.num_clients):
        memory = states[embedded.FIRST_NODE_ID + client][wire.MEMORY]
        mine = algo.personal_weights(shared_state(final), memory)
        assert set(mine) == set(algo.layout.router_names)
        with swapped_in(final, mine):
            result = evaluate(final, workload.test, cfg.eval.batch_size)
        keys, shares = workload.test_keys, workload.client_shares
        acc = personalised(result.accuracy_N, keys, shares)[client]
        loss = personalised(result.loss_N, keys, shares)[client]
        assert last["personal_model_accuracy"][client] == pytest.approx(acc, abs=1e-9)
        assert rows[client]["personal_model_loss"] == pytest.approx(loss, rel=1e-5)
        assert rows[client]["personal_model_loss"] != rows[client]["personal_loss"]


# ---- the ablations ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "setting"), [*ABLATIONS.items(), *VARIANTS.items()])
def test_an_ablation_or_variant_is_hfedmoe_with_one_setting_fixed(tiny_bert_dir, name, setting):
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm=name))
    algo = build_algorithm(cfg)
    key, value = setting
    assert getattr(algo.cfg.hfedmoe, key) == value
    changed = {k for k, v in algo.cfg.hfedmoe if getattr(cfg.hfedmoe, k) != v}
    assert changed == {key}


def _two_updates(model, seed=0):
    """Two clients' fabricated updates: usage, importance, update counts, trained weights."""
    em = ExpertModel(model)
    L, E = em.shape
    g = torch.Generator().manual_seed(seed)
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    ups, trained = {}, {}
    for node, n in ((11, 10), (22, 30)):
        trained[node] = {k: glob[k] + torch.randn(glob[k].shape, generator=g) for k in trainable}
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(trained[node][name])
        counts = torch.ones(L, E, dtype=torch.long)
        ups[node] = ClientUpdate(
            weights=upload_weights(model, counts > 0, em.expert_entries()),
            num_examples=n,
            stats={
                "usage": torch.full((L, E), 0.01),  # below tau: nobody "uses" any expert
                "importance": torch.rand(L, E, generator=g),
                "expert_updates": counts,
            },
        )
    return glob, ups, trained


def test_holder_averaging_ignores_usage_where_eq17_keeps_the_expert(tiny_bert_dir):
    for name, expect_changed in (("hfedmoe", False), ("hfedmoe-holder-avg", True)):
        cfg = validate(tiny_raw(tiny_bert_dir, algorithm=name))
        model = server_workload(cfg).model
        algo = build_algorithm(cfg)
        algo.bind(model)
        glob, ups, trained = _two_updates(model)
        new = algo.aggregate(1, glob, ups)
        for entries in algo.layout.experts.values():
            for x in entries:
                n = x.state_name
                want = 0.25 * trained[11][n] + 0.75 * trained[22][n] if expect_changed else glob[n]
                torch.testing.assert_close(new[n], want)


def test_fedavg_routers_ablation_averages_routers_by_examples(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="hfedmoe-fedavg-routers"))
    model = server_workload(cfg).model
    algo = build_algorithm(cfg)
    algo.bind(model)
    glob, ups, trained = _two_updates(model)
    new = algo.aggregate(1, glob, ups)
    for name in algo.layout.router_names:
        torch.testing.assert_close(new[name], 0.25 * trained[11][name] + 0.75 * trained[22][name])


# ---- every baseline in a real federated run, within the devices' budgets ------------------


@pytest.mark.parametrize("name", BASELINES)
def test_budget_aware_baselines_stay_within_every_budget(tiny_bert_dir, tmp_path, name):
    cfg = validate(three_tiers(tiny_bert_dir, name))
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    records = read_metrics(tmp_path / "run")
    for record in records[1:]:
        assert record["clients_ok"] == 3 and record["clients_failed"] == 0
        for client in record["clients"]:
            # a fixed assignment per round: within the budget over the whole round
            assert 0 < client["experts_updated"] <= client["expert_budget"]
            assert client["max_active_per_step"] <= client["expert_budget"]
        if name == "fedmoe":  # a sub-MoE: the download shrinks with the device
            by_tier = {c["tier"]: c["bytes_down"] for c in record["clients"]}
            assert by_tier["small"] < by_tier["medium"] < by_tier["large"]


# ---- the frozen-experts control ------------------------------------------------------------


def test_frozen_experts_trains_everything_but_the_experts(tiny_bert_dir, tmp_path):
    cfg = validate(three_tiers(tiny_bert_dir, "frozen-experts"))
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    for record in read_metrics(tmp_path / "run")[1:]:
        assert record["clients_ok"] == 3 and record["clients_failed"] == 0  # every tier fits
        assert [c["experts_updated"] for c in record["clients"]] == [0, 0, 0]
    initial = server_workload(cfg).model  # the same seed: the run's initial weights
    before = initial.state_dict()
    after = load_checkpoint(tmp_path / "run" / "model")[0].state_dict()
    layers = ExpertModel(initial).layers
    experts = [n for layer in layers for n in layer.expert_param_names]
    routers = [n for layer in layers for n in layer.router_params]
    assert experts and all(torch.equal(after[n], before[n]) for n in experts)
    assert all(not torch.equal(after[n], before[n]) for n in routers)  # the rest trains
