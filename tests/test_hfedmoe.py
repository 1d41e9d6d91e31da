"""The HFedMoE algorithm (METHOD.md §2-§7): the client keeps to its budget and reports what the
server needs; the server aggregates exactly by eqs. (17)-(21); a real federated run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hfedmoe.algorithms import ClientUpdate, build_algorithm
from hfedmoe.algorithms.hfedmoe import upload_weights
from hfedmoe.algorithms.sparse_aggregation import expert_weights, qualifies, router_weights
from hfedmoe.config import validate
from hfedmoe.engine.client_app import app as client_app
from hfedmoe.engine.inprocess import run_embedded
from hfedmoe.engine.server_app import app as server_app
from hfedmoe.model import ExpertModel
from hfedmoe.results import read_metrics
from hfedmoe.task import client_data, server_task

from .conftest import tiny_raw


@pytest.fixture
def setup(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="hfedmoe", hfedmoe={"expert_budget": 3}))
    task = server_task(cfg)
    algo = build_algorithm(cfg)
    algo.bind(task.model)
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


def test_server_aggregates_by_eqs_17_to_21(setup):
    cfg, task, algo = setup
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
    alpha = router_weights(u, s, tau)
    for layer, names in em.router_entries().items():
        for name in names:
            expected = alpha[0, layer] * A[name] + alpha[1, layer] * B[name]
            torch.testing.assert_close(new[name], expected.float())
    head = "classifier.weight"  # shared: FedAvg by |D_c|
    torch.testing.assert_close(new[head], 0.25 * A[head] + 0.75 * B[head])


def test_a_federated_run_keeps_every_client_within_budget(tiny_bert_dir, tmp_path):
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="hfedmoe", hfedmoe={"expert_budget": 2}))
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    rounds = read_metrics(tmp_path / "run")[1:]
    assert len(rounds) == cfg.federation.rounds
    for record in rounds:
        assert record["clients_ok"] == 2
        assert 0 <= record["routing_consistency_mean"] <= 1  # eq. (18), reported
        for client in record["clients"]:
            assert client["expert_budget"] == 2
            assert 0 < client["max_active_per_step"] <= 2
            assert client["experts_updated"] <= 2 * cfg.train.local_steps
            assert client["bytes_up"] < client["bytes_down"]  # only updated experts go up
