"""The HFedMoE algorithm (METHOD.md §2-§7): the client keeps to its budget and reports what the
server needs; the server aggregates exactly by eqs. (17)-(21); a real federated run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hfedmoe.algorithms import ClientUpdate, build_algorithm
from hfedmoe.algorithms.maths.sparse_aggregation import expert_weights, qualifies, router_weights
from hfedmoe.algorithms.mechanics.assignment import ASSIGNED, STRICT, held_experts
from hfedmoe.algorithms.mechanics.transfer import upload_weights
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.federation.workload import client_data, server_workload
from hfedmoe.foundation.config import validate
from hfedmoe.model import ExpertModel
from hfedmoe.results import read_metrics

from .support.configs import tiny_raw


@pytest.fixture
def setup(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="hfedmoe"))
    task = server_workload(cfg)
    algo = build_algorithm(cfg)
    algo.bind(task.model)
    algo.set_budgets({7: 3})  # node 7's device can train 3 experts per batch
    return cfg, task, algo


def test_client_trains_at_most_its_budget_and_reports_usage(setup):
    cfg, task, algo = setup
    weights = {k: v.clone() for k, v in task.model.state_dict().items()}
    client_task = algo.configure_client(1, weights, client=7)
    assert client_task.config == {"expert-budget": 3}
    update = algo.train_client(
        task.model, client_data(cfg, 0, 2), client_task, np.random.default_rng(0)
    )
    L, E = ExpertModel(task.model).shape
    assert update.metrics["max_active_per_step"] <= 3
    counts = update.stats["expert_updates"]
    assert counts.shape == (L, E) and int(counts.sum()) <= 3 * cfg.train.local_steps
    # u_c(e), eq. (16): a mean of softmaxes, so each layer's usage sums to 1
    torch.testing.assert_close(update.stats["usage"].sum(-1), torch.ones(L))
    assert update.stats["importance"].shape == (L, E)


@pytest.mark.parametrize("usage_over", ["data", "batches"])
def test_usage_is_eq_16_over_the_clients_data_after_training(tiny_bert_dir, usage_over):
    """METHOD.md §7: u_c(e) = (1/|D_c|) sum over all of D_c of G_e(x), after local training, in
    eval mode (the default); "batches": over the batches drawn while training, which differs."""
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="hfedmoe", hfedmoe={"usage_over": usage_over}))
    task = server_workload(cfg)
    algo = build_algorithm(cfg)
    algo.bind(task.model)
    data = client_data(cfg, 0, 2)
    request = algo.configure_client(1, dict(task.model.state_dict()), client=0)
    update = algo.train_client(task.model, data, request, np.random.default_rng(0))
    # by hand, with the trained model: every sample's mean gate over its real tokens, averaged
    em = ExpertModel(task.model)
    task.model.eval()
    batch = data.inputs(np.arange(len(data)))
    with torch.no_grad(), em.capture() as capture:
        task.model(**batch)
    expected = capture.sample_probs(batch["attention_mask"]).mean(1)  # (L, E)
    if usage_over == "data":
        torch.testing.assert_close(update.stats["usage"], expected)
        assert update.metrics["usage_seconds"] > 0
    else:
        assert not torch.allclose(update.stats["usage"], expected)


@pytest.mark.parametrize(
    ("router_alpha", "scope"),
    [("normalized", "per_layer"), ("as_written", "per_layer"), ("as_written", "all_layers")],
)
def test_server_aggregates_by_eqs_17_to_21(tiny_bert_dir, router_alpha, scope):
    """The server folds one reply at a time; the result is the closed form of eqs. (17) and
    (19)-(21) over both clients (with eq. (20)'s alphas as written: divided by |S_global|; per
    layer or over all layers)."""
    options = {"router_alpha": router_alpha, "router_alpha_scope": scope}
    raw = tiny_raw(tiny_bert_dir, algorithm="hfedmoe", hfedmoe=options)
    raw["federation"]["max_client_share"] = 1.0  # the closed form, uncapped (test_defences.py)
    cfg = validate(raw)
    task = server_workload(cfg)
    algo = build_algorithm(cfg)
    algo.bind(task.model)
    em = ExpertModel(task.model)
    L, E = em.shape
    glob = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    ups = {}
    trained = {}  # each client's full trained weights: the reference for the expectations
    entries = em.expert_entries()
    for node, n in ((11, 10), (22, 30)):
        usage = torch.softmax(torch.randn(L, E, generator=g) * 3, -1)
        counts = torch.randint(0, 2, (L, E), generator=g)
        trained[node] = {k: glob[k] + torch.randn(glob[k].shape, generator=g) for k in trainable}
        with torch.no_grad():
            for name, p in task.model.named_parameters():
                if name in trained[node]:
                    p.copy_(trained[node][name])
        ups[node] = ClientUpdate(
            weights=upload_weights(task.model, counts > 0, entries),  # updated experts only
            num_examples=n,
            stats={
                "usage": usage,
                "importance": torch.rand(L, E, generator=g),
                "expert_updates": counts,
            },
        )
    new = algo.aggregate(1, glob, ups)

    A, B = trained[11], trained[22]
    tau = cfg.hfedmoe.tau
    u = torch.stack([ups[11].stats["usage"], ups[22].stats["usage"]])
    counts = torch.stack([ups[11].stats["expert_updates"], ups[22].stats["expert_updates"]])
    w = expert_weights(torch.tensor([10, 30]), qualifies(u, tau, counts))
    for (layer, e), entries in em.expert_entries().items():
        for entry in entries:
            wa, wb = w[0, layer, e].item(), w[1, layer, e].item()
            expected = (
                glob[entry.state_name]
                if wa + wb == 0
                else (wa * A[entry.state_name] + wb * B[entry.state_name])
            )
            torch.testing.assert_close(new[entry.state_name], expected.float())
    s = torch.stack([ups[11].stats["importance"], ups[22].stats["importance"]])
    alpha = router_weights(u, s, tau, normalize=router_alpha == "normalized", scope=scope)
    for layer, names in em.router_entries().items():
        for name in names:
            expected = alpha[0, layer] * A[name] + alpha[1, layer] * B[name]
            torch.testing.assert_close(new[name], expected.float())
    head = "classifier.weight"  # shared: FedAvg by |D_c|
    torch.testing.assert_close(new[head], 0.25 * A[head] + 0.75 * B[head])


def test_usage_only_counts_an_expert_a_client_uploaded(tiny_bert_dir):
    # expert_used = "usage": u >= tau is not enough when the client never routed to (so never
    # trained or sent) the expert; eq. (17) must weigh only the clients that sent it.
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="hfedmoe", hfedmoe={"expert_used": "usage"}))
    task = server_workload(cfg)
    algo = build_algorithm(cfg)
    algo.bind(task.model)
    em = ExpertModel(task.model)
    L, E = em.shape
    assert cfg.hfedmoe.tau <= 1.0 / E
    glob = {k: v.clone() for k, v in task.model.state_dict().items()}
    ups = {}
    for client, shift, sends_00 in ((3, 1.0, True), (4, 2.0, False)):
        sent = torch.zeros(L, E, dtype=torch.bool)
        sent[0, 0] = sends_00
        with torch.no_grad():
            for name, p in task.model.named_parameters():
                p.copy_(glob[name] + shift)  # the client's "trained" weights
        ups[client] = ClientUpdate(
            weights=upload_weights(task.model, sent, em.expert_entries()),
            num_examples=5,
            stats={  # both use every expert equally (1/E >= tau)
                "usage": torch.full((L, E), 1.0 / E),
                "importance": torch.ones(L, E),
                "expert_updates": torch.zeros(L, E),
            },
        )
    new = algo.aggregate(1, glob, ups)
    for (layer, e), entries in em.expert_entries().items():
        for entry in entries:
            was = glob[entry.state_name]
            expected = was + 1.0 if (layer, e) == (0, 0) else was  # client 3's alone, or kept
            torch.testing.assert_close(entry.take(new[entry.state_name]), entry.take(expected))


# ---- strict mode (METHOD.md §7, beyond the paper) -------------------------------------------


def test_held_set_takes_each_layers_best_then_the_best_of_the_rest():
    score = torch.tensor([[0.1, 0.5, 0.2, 0.0], [0.9, 0.8, 0.1, 0.3]])
    held = held_experts(score, 3)
    assert held.nonzero().tolist() == [[0, 1], [1, 0], [1, 1]]
    assert held_experts(score, 2).nonzero().tolist() == [[0, 1], [1, 0]]  # one per layer
    with pytest.raises(ValueError, match="at least one expert per layer"):
        held_experts(score, 1)


def test_strict_client_downloads_trains_and_uploads_only_its_held_experts(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="hfedmoe", hfedmoe={"mode": "strict"}))
    task = server_workload(cfg)
    algo = build_algorithm(cfg)
    algo.bind(task.model)
    algo.set_budgets({7: 3})
    glob = {k: v.clone() for k, v in task.model.state_dict().items()}
    client_task = algo.configure_client(1, glob, client=7)
    assert client_task.config[STRICT] == 1
    held_flat = client_task.config[ASSIGNED]
    assert len(held_flat) == 3
    em = ExpertModel(task.model)
    L, E = em.shape
    held = torch.zeros(L * E, dtype=torch.bool)
    held[held_flat] = True
    held = held.view(L, E)
    assert held.any(1).all()  # every layer can route
    entries = em.expert_entries()
    down_experts = {x.state_name for ex, es in entries.items() if held[ex] for x in es}
    unheld = {x.state_name for ex, es in entries.items() if not held[ex] for x in es}
    assert down_experts <= set(client_task.weights) and not unheld & set(client_task.weights)

    update = algo.train_client(
        task.model, client_data(cfg, 0, 2), client_task, np.random.default_rng(0)
    )
    assert not update.stats["expert_updates"][~held].any()  # nothing outside the held set
    assert not unheld & set(update.weights)
    # what it trained went up, and the server can aggregate it
    new = algo.aggregate(1, glob, {7: update})
    for ex, es in entries.items():
        for x in es:
            if not held[ex]:
                torch.testing.assert_close(new[x.state_name], glob[x.state_name])


def test_strict_clients_hold_their_budget_in_a_federated_run(tiny_bert_dir, tmp_path):
    from .support.tiers import three_tiers

    cfg = validate(three_tiers(tiny_bert_dir, "hfedmoe", mode="strict"))
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    records = read_metrics(tmp_path / "run")
    for record in records[1:]:
        assert record["clients_ok"] == 3
        by_tier = {c["tier"]: c for c in record["clients"]}
        for client in record["clients"]:
            # the held set is fixed for the round: the experts trained over the whole round,
            # not only per batch, are within the budget
            assert client["experts_updated"] <= client["expert_budget"]
            assert client["experts_routed"] <= client["expert_budget"]
        down = [by_tier[t]["bytes_down"] for t in ("small", "medium", "large")]
        assert down[0] < down[1] < down[2]
