"""FFT-MoE (METHOD.md §9b): MoE adapters beside the frozen FFNs of the dense parent, k(c) from the
device, the heterogeneity-aware load-balancing loss, FedAvg of the adapters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, BertForSequenceClassification

from hfedmoe.algorithms import ClientUpdate, build_algorithm
from hfedmoe.algorithms.baselines.fftmoe import TOP_K, BalancedRouting
from hfedmoe.algorithms.maths.load_balancing import (
    balance_loss,
    client_weight,
    kl_from_uniform,
    slot_shares,
)
from hfedmoe.budget import CostModels
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.federation.workload import client_data, client_model, label_names, server_workload
from hfedmoe.foundation.config import ModelConfig, validate
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.model import ExpertModel, build_causal_lm, build_classifier, load_tokenizer
from hfedmoe.model.adapters import adapters, routing_top_k
from hfedmoe.model.checkpoint import load_checkpoint, save_checkpoint
from hfedmoe.model.state import shared_state
from hfedmoe.results import read_metrics

from .support.configs import tiny_raw

LABELS = ("a", "b", "c")
TEXTS = ["Shares rose sharply after the merger.", "The striker scored twice in the final."]
ADAPTERS = {"experts": 4, "hidden": 8, "k_max": 2}


def _adapted(model_dir, **fftmoe) -> ModelConfig:
    raw = tiny_raw(model_dir, algorithm="fftmoe", fftmoe={**ADAPTERS, **fftmoe})
    return validate(raw).model


# ---- step 3: the load-balancing loss, by hand ---------------------------------------------


def test_slot_shares_and_balance_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])  # (N=2, M=3)
    chosen = torch.tensor([[True, True, False], [False, True, True]])  # top-2 of each token
    f = slot_shares(chosen)  # slots: expert 0 once, 1 twice, 2 once, of 4
    torch.testing.assert_close(f, torch.tensor([0.25, 0.5, 0.25]))
    P = torch.tensor([0.4, 0.4, 0.2])  # the column means
    assert balance_loss(probs, chosen).item() == pytest.approx(3 * float((f * P).sum()))
    assert balance_loss(probs, chosen).item() == pytest.approx(3 * (0.1 + 0.2 + 0.05))


def test_uniform_routing_costs_one_and_skew_costs_more():
    M = 4
    uniform = torch.full((8, M), 1 / M)
    chosen = torch.zeros(8, M, dtype=torch.bool)
    chosen[torch.arange(8), torch.arange(8) % M] = True  # every expert gets 2 tokens
    assert balance_loss(uniform, chosen).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    all_to_0 = torch.zeros(8, M, dtype=torch.bool)
    all_to_0[:, 0] = True
    assert balance_loss(skewed, all_to_0).item() == pytest.approx(M * 0.97)


def test_kl_from_uniform_and_the_client_weight_by_hand():
    assert kl_from_uniform(torch.tensor([0.25, 0.25, 0.25, 0.25])) == pytest.approx(0.0)
    assert kl_from_uniform(torch.tensor([1.0, 0.0])) == pytest.approx(math.log(2))
    # p = (3/4, 1/4): log 2 + 3/4 log 3/4 + 1/4 log 1/4
    assert kl_from_uniform(torch.tensor([3.0, 1.0])) == pytest.approx(
        math.log(2) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    )
    assert client_weight(0.01, None) == 0.01
    assert client_weight(0.01, torch.tensor([1.0, 0.0])) == pytest.approx(0.01 * (1 + math.log(2)))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=2, max_size=16))
def test_kl_from_uniform_is_between_zero_and_log_m(weights):
    p = torch.tensor(weights, dtype=torch.float64)
    if float(p.sum()) <= 0:
        return
    kl = kl_from_uniform(p)
    assert -1e-9 <= kl <= math.log(len(weights)) + 1e-9


def test_the_auxiliary_loss_trains_the_router_and_weighs_a_skewed_client_more(tiny_bert_dir):
    model = build_classifier(_adapted(tiny_bert_dir), LABELS, seed=0)
    batch = load_tokenizer(_adapted(tiny_bert_dir))(TEXTS, padding=True, return_tensors="pt")
    hooks = BalancedRouting(model, lam=0.01, heterogeneity=True)
    with hooks.recording():
        model(**batch)
    loss = hooks.auxiliary_loss(batch)
    loss.backward()
    assert all(block.gate.weight.grad is not None for block in adapters(model))
    P_c = hooks.prob_sum  # the client's routing so far, per layer
    weights = [client_weight(0.01, P_c[i]) for i in range(P_c.shape[0])]
    assert all(w > 0.01 for w in weights)  # any skew adds to lambda
    flat = BalancedRouting(model, lam=0.01, heterogeneity=False)
    with flat.recording():
        model(**batch)
    assert flat.auxiliary_loss(batch).item() < loss.item()


# ---- step 1: the adapted model ------------------------------------------------------------


def test_an_adapted_classifier_starts_as_its_dense_parent(tiny_bert_dir):
    model = build_classifier(_adapted(tiny_bert_dir), LABELS, seed=0).eval()
    dense = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    dense.classifier.load_state_dict(model.classifier.state_dict())
    batch = load_tokenizer(_adapted(tiny_bert_dir))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, dense.eval()(**batch).logits)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"bert", "classifier"}  # the adapters and the new head, no base weight
    assert all(
        ".adapter." in n or n.startswith("classifier")
        for n, p in model.named_parameters()
        if p.requires_grad
    )
    assert ExpertModel(model).shape == (2, 4)  # one adapter of M = 4 per block


def test_an_adapted_decoder_starts_as_its_dense_parent(tiny_llama_dir):
    model = build_causal_lm(_adapted(tiny_llama_dir), seed=0).eval()
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    batch = load_tokenizer(_adapted(tiny_llama_dir))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, dense(**batch).logits)
    assert ExpertModel(model).shape == (3, 4)
    assert all(".adapter." in n for n, p in model.named_parameters() if p.requires_grad)


def test_the_adapter_adds_s_times_the_routed_experts_by_hand(tiny_llama_dir):
    cfg = _adapted(tiny_llama_dir, scale=0.5)
    model = build_causal_lm(cfg, seed=0).eval()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        for e, expert in enumerate(block.adapter.experts):
            expert.fc_out.weight.normal_(generator=torch.Generator().manual_seed(e))
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = block(x)
        x_NH = x.reshape(3, 32)
        probs = torch.softmax(x_NH @ block.adapter.gate.weight.T, dim=-1)
        top, idx = probs.topk(2, dim=-1)
        g = top / top.sum(-1, keepdim=True)  # the softmax over the top-k logits
        want = block.ffn(x_NH).clone()
        for n in range(3):
            for j in range(2):
                expert = block.adapter.experts[int(idx[n, j])]
                hidden = torch.nn.functional.gelu(expert.fc_in(x_NH[n]))
                want[n] += 0.5 * g[n, j] * expert.fc_out(hidden)
    torch.testing.assert_close(got.reshape(3, 32), want)


def test_routing_top_k_is_set_for_the_block_and_restored(tiny_llama_dir):
    model = build_causal_lm(_adapted(tiny_llama_dir), seed=0)
    with routing_top_k(model, 1):
        assert {b.gate.top_k for b in adapters(model)} == {1}
        assert {layer.top_k for layer in ExpertModel(model).layers} == {1}
    assert {b.gate.top_k for b in adapters(model)} == {2}
    with pytest.raises(ValueError, match="top-k"), routing_top_k(model, 5):
        pass


def test_an_adapted_checkpoint_round_trips(tiny_llama_dir, tmp_path):
    cfg = _adapted(tiny_llama_dir)
    model = build_causal_lm(cfg, seed=0).eval()
    with torch.no_grad():
        for block in adapters(model):
            block.experts[0].fc_out.weight.fill_(0.01)
    save_checkpoint(model, load_tokenizer(cfg), cfg, tmp_path / "ckpt", "language-modeling")
    reloaded, tokenizer = load_checkpoint(tmp_path / "ckpt")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


# ---- the config ---------------------------------------------------------------------------


def test_fftmoe_runs_on_the_dense_parent_whatever_moe_the_experiment_builds(tiny_bert_dir):
    raw = tiny_raw(
        tiny_bert_dir,
        algorithm="fftmoe",
        model={"moe_layers": [1]},
        fftmoe={"experts": 6, "hidden": 16, "k_max": 3, "blocks": "moe_layers"},
    )
    model = validate(raw).model
    assert model.moe_adapters is not None
    assert (model.moe_adapters.experts, model.moe_adapters.hidden) == (6, 16)
    assert (model.moe_adapters.top_k, model.moe_adapters.layers) == (3, [1])
    assert model.frozen_base
    assert validate({**raw, "algorithm": "hfedmoe"}).model.moe_adapters is None
    again = validate(validate(raw).model_dump())  # a saved run's config validates the same
    assert again == validate(raw)


def test_fftmoe_config_errors_name_the_field(tiny_bert_dir):
    with pytest.raises(ConfigError, match=r"fftmoe\.k_max"):
        validate(tiny_raw(tiny_bert_dir, algorithm="fftmoe", fftmoe={"experts": 2, "k_max": 3}))
    with pytest.raises(ConfigError, match=r"model\.lora"):
        validate(tiny_raw(tiny_bert_dir, algorithm="fftmoe", model={"lora": {"rank": 2}}))


# ---- step 2: k(c) from the device ---------------------------------------------------------


def _tiers_for_k(tiny_bert_dir) -> dict:
    """Three clients whose devices fit k = 1, k = 2 (= k_max) and everything."""
    raw = tiny_raw(
        tiny_bert_dir,
        algorithm="fftmoe",
        fftmoe=ADAPTERS,
        federation={"num_clients": 3, "clients_per_round": 3, "rounds": 2},
    )
    cfg = validate(raw)
    costs = CostModels(client_model(cfg, label_names(cfg)), cfg)
    peak = {k: costs.at(k).predict(costs.at(k).num_experts).peak_bytes for k in (1, 2)}
    assert peak[1] < peak[2]  # more experts per token: more activations to keep
    raw["devices"] = {
        "tiers": [
            {"name": "small", "memory": (peak[1] + peak[2]) // 2},
            {"name": "large", "memory": 2 * peak[2]},
        ],
        "assignment": ["small", "large", "large"],
    }
    return raw


def test_k_of_c_is_the_largest_top_k_the_device_fits(tiny_bert_dir):
    raw = _tiers_for_k(tiny_bert_dir)
    cfg = validate(raw)
    algo = build_algorithm(cfg)
    costs = CostModels(client_model(cfg, label_names(cfg)), cfg)
    small, large = cfg.devices.tiers
    assert algo.device_budget(costs, small) == 1
    assert algo.device_budget(costs, large) == 2
    tiny = small.model_copy(update={"memory": costs.at(1).predict(1).peak_bytes - 1})
    assert algo.device_budget(costs, tiny) == 0  # not even one expert per token
    assert algo.device_budget(costs, None) == 2
    algo.set_budgets({0: 1, 1: 2})
    assert algo.configure_client(1, {}, 0).config[TOP_K] == 1
    assert algo.configure_client(1, {}, 1).config[TOP_K] == 2


def test_every_client_routes_to_its_own_k_in_a_real_run(tiny_bert_dir, tmp_path):
    cfg = validate(_tiers_for_k(tiny_bert_dir))
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    records = read_metrics(tmp_path / "run")
    for record in records[1:]:
        assert record["clients_ok"] == 3 and record["clients_failed"] == 0
        for client in record["clients"]:
            assert (
                client["top_k"]
                == client["expert_budget"]
                == {"small": 1, "large": 2}[client["tier"]]
            )
            # the measured training memory is what the cost model of its k(c) predicts, or less
            assert client["memory_predicted_bytes"] > 0
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"trainable_parameters"' in summary


# ---- step 4: FedAvg of every adapter parameter ----------------------------------------------


@pytest.mark.parametrize("aggregation", ["fedavg", "activated"])
def test_adapters_are_averaged_by_examples(tiny_bert_dir, aggregation):
    cfg = validate(
        tiny_raw(tiny_bert_dir, algorithm="fftmoe", fftmoe={**ADAPTERS, "aggregation": aggregation})
    )
    model = server_workload(cfg).model
    algo = build_algorithm(cfg)
    algo.bind(model)
    glob = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    trained = {
        c: {n: t + torch.randn(t.shape, generator=g) for n, t in glob.items()} for c in (0, 1)
    }
    routed = torch.ones(2, 4, dtype=torch.long)
    routed[0, 3] = 0  # client 0's batches never reached expert 3 of layer 0
    updates = {
        0: ClientUpdate(trained[0], 10, stats={"expert_updates": routed}),
        1: ClientUpdate(trained[1], 30, stats={"expert_updates": torch.ones(2, 4)}),
    }
    new = algo.aggregate(1, glob, updates)
    assert set(new) == set(glob)
    for name in glob:
        want = 0.25 * trained[0][name] + 0.75 * trained[1][name]
        if aggregation == "activated" and ".0.output.adapter.experts.3." in name:
            want = trained[1][name]  # only client 1 activated it
        torch.testing.assert_close(new[name], want)


def test_a_client_trains_only_the_adapters_with_its_k(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="fftmoe", fftmoe=ADAPTERS))
    workload = server_workload(cfg)
    algo = build_algorithm(cfg)
    model = client_model(cfg, workload.label_names)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = client_data(cfg, 0, 2)
    request = algo.configure_client(1, dict(shared_state(workload.model)), 0)
    request.config[TOP_K] = 1
    update = algo.train_client(model, data, request, np.random.default_rng(0))
    assert update.metrics["top_k"] == 1.0
    assert set(update.weights) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name])  # the dense parent never moves
    assert {b.gate.top_k for b in adapters(model)} == {2}  # the resident model is restored


def test_the_adapters_may_have_their_own_learning_rate(tiny_bert_dir):
    moved = {}
    for lr in (None, 1e-1):
        cfg = validate(tiny_raw(tiny_bert_dir, algorithm="fftmoe", fftmoe={**ADAPTERS, "lr": lr}))
        workload = server_workload(cfg)
        model = client_model(cfg, workload.label_names)
        start = dict(shared_state(workload.model))
        request = build_algorithm(cfg).configure_client(1, start, 0)
        update = build_algorithm(cfg).train_client(
            model, client_data(cfg, 0, 2), request, np.random.default_rng(0)
        )
        moved[lr] = sum(float((update.weights[n] - start[n]).norm()) for n in start)
    assert moved[1e-1] > 10 * moved[None]  # train.lr is 1e-3
