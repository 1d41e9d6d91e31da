"""Specialising constructions: each step of ``cluster`` by hand, the specialisation corpus's
disjointness, and the build, cache and loading on tiny models (a real build is not run here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from hfedmoe.construction import ensure_prepared, prepared_dir, recipe
from hfedmoe.construction.cluster import (
    distil_experts_,
    drop_neurons_,
    fit_router,
    kmeans_domains,
    relative_error,
)
from hfedmoe.data.datasets import load_holdout, read_dataset, split_rows
from hfedmoe.federation.workload import partitions, server_workload
from hfedmoe.foundation.config import DataConfig, validate
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.model import ExpertFFN, GatedExpertFFN, MoEFeedForward, build_model, load_checkpoint
from hfedmoe.model.upcycle import moe_blocks

from .support.cli import invoke_cli
from .support.configs import tiny_raw

# ---- the steps, by hand ----------------------------------------------------------------------


def test_kmeans_finds_two_obvious_domains():
    docs = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.95, 0.0]])
    labels = kmeans_domains(docs, 2, seed=0)
    assert labels[0] == labels[1] == labels[4] != labels[2] == labels[3]


def test_the_fitted_router_sends_each_domains_tokens_to_its_expert():
    # domain 0 lives along the first axis, domain 1 along the second (no bias needed)
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(50, 2, generator=g) * 0.1 + torch.tensor([1.0, 0.0]),
            torch.randn(50, 2, generator=g) * 0.1 + torch.tensor([0.0, 1.0]),
        ]
    )
    domain = torch.tensor([0] * 50 + [1] * 50)
    weight, accuracy = fit_router(x, domain, num_experts=3, steps=200)
    assert weight.shape == (3, 2)
    assert accuracy == 1.0
    probs = torch.softmax(x @ weight.T, -1)
    assert (probs[:50, 0] > 0.7).all() and (probs[50:, 1] > 0.7).all()  # sure, not just right


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_drop_upcycling_redraws_exactly_the_chosen_neurons(kind):
    torch.manual_seed(0)
    if kind == "bert":
        expert = ExpertFFN(6, 10, nn.functional.gelu)
        ins, out = [expert.fc_in], expert.fc_out
    else:
        expert = GatedExpertFFN(6, 10, nn.functional.silu)
        ins, out = [expert.gate_proj, expert.up_proj], expert.down_proj
    before = {n: p.detach().clone() for n, p in expert.named_parameters()}
    dropped = drop_neurons_(expert, 0.3, torch.Generator().manual_seed(1))
    assert len(dropped) == 3 and len(set(dropped.tolist())) == 3
    kept = [i for i in range(10) if i not in dropped.tolist()]
    names = {id(p): n for n, p in expert.named_parameters()}
    for linear in ins:  # neurons are rows of the up (and gate) projections
        w0 = before[names[id(linear.weight)]]
        assert torch.equal(linear.weight[kept], w0[kept])
        assert not torch.equal(linear.weight[dropped], w0[dropped])
    w0 = before[names[id(out.weight)]]  # ... and columns of the down projection
    assert torch.equal(out.weight[:, kept], w0[:, kept])
    assert not torch.equal(out.weight[:, dropped], w0[:, dropped])
    if out.bias is not None:  # the output bias belongs to no neuron
        assert torch.equal(out.bias, before[names[id(out.bias)]])


def test_dropping_no_neurons_changes_nothing():
    expert = ExpertFFN(4, 8, nn.functional.gelu)
    before = [p.detach().clone() for p in expert.parameters()]
    assert len(drop_neurons_(expert, 0.0, torch.Generator().manual_seed(0))) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, expert.parameters(), strict=True))


def test_relative_error_by_hand():
    # ((1-2)^2 + (0-0)^2) / (2^2 + 0^2) = 1/4
    assert float(relative_error(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]))) == 0.25


def test_distillation_moves_the_experts_towards_the_dense_ffn_and_never_the_router():
    torch.manual_seed(0)
    dense = ExpertFFN(8, 16, nn.functional.gelu)
    experts = [ExpertFFN(8, 16, nn.functional.gelu) for _ in range(4)]
    for e in experts:
        e.load_state_dict(dense.state_dict())
        drop_neurons_(e, 0.5, torch.Generator().manual_seed(2))
    block = MoEFeedForward(experts, 8, top_k=2)
    nn.init.normal_(block.gate.weight)
    router = block.gate.weight.detach().clone()
    x = torch.randn(256, 8)
    with torch.no_grad():
        target = dense(x)
        before = float(relative_error(block(x.unsqueeze(0))[0], target))
    distil_experts_(block, x, target, 100, 1e-2, 128, torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = float(relative_error(block(x.unsqueeze(0))[0], target))
    assert after < before / 4
    assert torch.equal(block.gate.weight, router) and block.gate.weight.requires_grad


# ---- the specialisation corpus -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"dataset": "bbc_news"},
        {
            "dataset": "qa_mix",
            "task": "multiple-choice",
            "max_examples_per_group": 1000,
            "partition_by": "group",
            "dirichlet_alpha": 0.1,
        },
    ],
)
def test_the_corpus_is_disjoint_from_every_seeds_clients_and_test_split(data):
    cfg = DataConfig(**data, holdout_fraction=0.2)
    full = read_dataset(cfg)
    holdouts = []
    for seed in (0, 1, 2):
        rows = split_rows(full, cfg, seed)
        holdouts.append(rows.holdout)
        assert not set(rows.holdout) & set(rows.train)
        assert not set(rows.holdout) & set(rows.test)
        run = validate({"seed": seed, "data": data | {"holdout_fraction": 0.2}})
        for part in partitions(run, full.subset(rows.train), 8):  # indices into the train rows
            assert not set(rows.train[part]) & set(rows.holdout)
    assert all(np.array_equal(h, holdouts[0]) for h in holdouts)  # the same corpus for every seed
    strata = full.groups if full.choices is not None else full.labels
    for s in np.unique(strata):  # every label (task) is in the corpus, at its share
        share = np.mean(strata[holdouts[0]] == s)
        assert share == pytest.approx(np.mean(strata == s), abs=0.01)
    assert len(load_holdout(cfg)) == len(holdouts[0])


def test_no_holdout_leaves_every_row_to_the_run():
    full = read_dataset(DataConfig())
    rows = split_rows(full, DataConfig(), seed=0)
    assert len(rows.holdout) == 0 and len(rows.train) + len(rows.test) == len(full)


def test_a_construction_needs_a_corpus():
    with pytest.raises(ConfigError, match=r"data\.holdout_fraction: model\.construction 'cluster'"):
        validate({"model": {"construction": "cluster"}})


# ---- build, cache, load ------------------------------------------------------------------------

SPECIALISE = {"corpus_examples": 40, "router_steps": 30, "expert_steps": 5, "max_tokens": 500}


def _cluster_raw(model_dir, **data):
    return tiny_raw(
        model_dir,
        model={"construction": "cluster", "specialise": SPECIALISE},
        data={"holdout_fraction": 0.2, **data},
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HFEDMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_build_is_cached_by_its_recipe_and_not_by_the_runs_seed(tiny_bert_dir, cache):
    cfg = validate(_cluster_raw(tiny_bert_dir))
    directory = ensure_prepared(cfg)
    assert directory.parent == cache / "models" and directory.name.startswith("cluster-")
    build = json.loads((directory / "build.json").read_text())
    assert build["construction"] == recipe(cfg)
    assert len(build["layers"]) == 2 and sum(build["domain_sizes"]) == 40
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    other_seed = validate({**_cluster_raw(tiny_bert_dir), "seed": 3, "algorithm": "hfedmoe"})
    assert ensure_prepared(other_seed) == directory  # found, not rebuilt
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp
    longer = _cluster_raw(tiny_bert_dir)
    longer["model"]["specialise"] = {**SPECIALISE, "expert_steps": 6}
    assert prepared_dir(validate(longer)) != directory


def test_runs_start_from_the_built_model_with_their_own_head(tiny_bert_dir, cache):
    runs = [validate({**_cluster_raw(tiny_bert_dir), "seed": s}) for s in (0, 1)]
    models = [server_workload(cfg).model for cfg in runs]
    built, _ = load_checkpoint(ensure_prepared(runs[0]))
    body = {n: t for n, t in built.state_dict().items() if n.startswith("bert.")}
    for model in models:
        state = model.state_dict()
        assert all(torch.equal(state[n], t) for n, t in body.items())
    # the head is new in every run, from the run's seed
    assert not torch.equal(models[0].classifier.weight, models[1].classifier.weight)
    routers = [b.gate.weight for b in moe_blocks(models[0])]
    assert all(float(r.abs().sum()) > 0 for r in routers)


def test_a_built_model_loads_from_its_path_like_any_local_model(tiny_bert_dir, cache):
    cfg = validate(_cluster_raw(tiny_bert_dir))
    directory = ensure_prepared(cfg)
    local = validate(tiny_raw(directory))  # model.name_or_path = the folder, plain upcycle
    model = build_model(local.model, "classification", ("a", "b", "c", "d", "e"), seed=0)
    built, _ = load_checkpoint(directory)
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in built.state_dict().items() if "bert." in n)
    wrong = local.model.model_copy(update={"num_experts": 2})
    with pytest.raises(
        ConfigError, match=r"model\.num_experts: 2 differs from the saved model's 4"
    ):
        build_model(wrong, "classification", ("a", "b"), seed=0, model_dir=directory)


def test_the_decoder_build_specialises_a_llama(tiny_llama_dir, cache):
    data = {
        "dataset": "qa_mix",
        "task": "multiple-choice",
        "max_examples_per_group": 100,
        "partition_by": "group",
    }
    raw = _cluster_raw(tiny_llama_dir, **data)
    raw["model"]["max_length"] = 48  # room for a question and its longest answer
    cfg = validate(raw)
    directory = ensure_prepared(cfg)
    build = json.loads((directory / "build.json").read_text())
    for layer in build["layers"]:  # drop, then distillation brings the dense function back
        assert layer["error_after_distillation"] < layer["error_after_drop"]
    model = server_workload(cfg).model
    experts = moe_blocks(model)[0].experts
    assert not torch.equal(experts[0].up_proj.weight, experts[1].up_proj.weight)


def test_prepare_command_builds_once_and_refuses_upcycle(tiny_bert_dir, cache, tmp_path):
    import tomli_w

    config = tmp_path / "cluster.toml"
    config.write_text(tomli_w.dumps(_cluster_raw(tiny_bert_dir)))
    first = invoke_cli("prepare", str(config), "--no-progress")
    assert first.returncode == 0, first.stderr
    assert "Model:" in first.stdout and "router accuracy" in first.stdout
    again = invoke_cli("prepare", str(config), "--no-progress")
    assert again.returncode == 0 and "building" not in again.stderr
    upcycle = invoke_cli("prepare", str(config), "--set", "model.construction=upcycle")
    assert upcycle.returncode == 2
    assert "model.construction: 'upcycle' builds nothing ahead" in upcycle.stderr


def test_a_saved_run_model_keeps_its_head_only_for_the_same_labels(tiny_bert_dir, tmp_path):
    from hfedmoe.model import load_tokenizer, save_checkpoint

    cfg = validate(tiny_raw(tiny_bert_dir))
    labels = ("a", "b", "c")
    trained = build_model(cfg.model, "classification", labels, seed=5)
    with torch.no_grad():
        trained.classifier.weight.fill_(0.5)  # a head "trained" on these labels
    saved = save_checkpoint(
        trained, load_tokenizer(cfg.model), cfg.model, tmp_path / "m", "classification"
    )
    same = build_model(cfg.model, "classification", labels, seed=0, model_dir=saved)
    assert torch.equal(same.classifier.weight, trained.classifier.weight)
    other = build_model(cfg.model, "classification", ("x", "y", "z"), seed=0, model_dir=saved)
    assert not torch.equal(other.classifier.weight, trained.classifier.weight)
    fewer = build_model(cfg.model, "classification", ("x", "y"), seed=0, model_dir=saved)
    assert fewer.classifier.weight.shape[0] == 2  # a head for these labels, the body as saved
    body = {n: t for n, t in trained.state_dict().items() if n.startswith("bert.")}
    assert all(torch.equal(other.state_dict()[n], t) for n, t in body.items())
