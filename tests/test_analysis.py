"""`hfedmoe analyze`: the specialisation measures by hand, and the command on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tomli_w
import torch

from hfedmoe.analysis.measures import (
    group_shares,
    jensen_shannon,
    load_cv,
    mean_pairwise_jsd,
    normalised_entropy,
    normalised_mutual_information,
    removal_ratio,
)
from hfedmoe.analysis.routing import collect_routing, loss_with, losses_without, removal_mask
from hfedmoe.analysis.selection import (
    last_updates,
    pooled_ratio,
    random_like,
    removable,
    selection_cost,
)
from hfedmoe.data.datasets import load_dataset
from hfedmoe.data.tokenized import tokenize_for
from hfedmoe.federation.workload import partitions, server_workload
from hfedmoe.foundation.config import validate
from hfedmoe.model import ExpertModel
from hfedmoe.model.prefix import BlockPrefix, blocks_before_first_moe
from hfedmoe.training import evaluate

from .support import families
from .support.cli import invoke_cli
from .support.configs import tiny_raw

# ---- the measures, by hand ----------------------------------------------------------------


def test_normalised_entropy_is_one_for_a_uniform_router_and_zero_for_a_sure_one():
    assert normalised_entropy(torch.full((3, 4), 0.25)) == pytest.approx(1.0)
    assert normalised_entropy(torch.eye(4)) == pytest.approx(0.0)
    # half on two of four experts: log 2 / log 4
    assert normalised_entropy(torch.tensor([[0.5, 0.5, 0.0, 0.0]])) == pytest.approx(0.5)


def test_load_cv_by_hand():
    assert load_cv(torch.tensor([3, 3, 3, 3])) == 0.0
    assert load_cv(torch.tensor([2, 0])) == pytest.approx(1.0)  # std 1 over mean 1
    assert load_cv(torch.tensor([0, 0])) == 0.0


def test_normalised_mutual_information_by_hand():
    assert normalised_mutual_information(torch.tensor([[5, 0], [0, 5]])) == pytest.approx(1.0)
    assert normalised_mutual_information(torch.tensor([[1, 1], [1, 1]])) == pytest.approx(0.0)
    assert normalised_mutual_information(torch.tensor([[3, 4]])) == 0.0  # one group
    # joint [[1, 0], [1, 2]] / 4: p_G = (1/4, 3/4), p_E = (1/2, 1/2)
    mi = 0.25 * math.log(0.25 / 0.125) + 0.25 * math.log(0.25 / 0.375)
    mi += 0.5 * math.log(0.5 / 0.375)
    h_g = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    h_e = math.log(2)
    got = normalised_mutual_information(torch.tensor([[1, 0], [1, 2]]))
    assert got == pytest.approx(mi / ((h_g + h_e) / 2))


def test_group_shares_rows_sum_to_k():
    # top-2: 2 tokens of group 0 go to both experts; 2 of group 1 only ... to expert 1, twice
    shares = group_shares(torch.tensor([[2.0, 2.0], [0.0, 4.0]]), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(shares, torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64))


def test_jensen_shannon_in_bits():
    assert jensen_shannon(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(1)
    assert jensen_shannon(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7])) == pytest.approx(0)
    u_CLE = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]])  # 3 clients, 1 layer
    assert mean_pairwise_jsd(u_CLE) == pytest.approx(2 / 3)  # pairs: 1, 0, 1
    assert mean_pairwise_jsd(u_CLE[:1]) == 0.0


def test_removal_ratio_by_hand():
    assert removal_ratio(1.0, 1.6, 1.2) == pytest.approx(3.0)
    assert removal_ratio(1.0, 1.5, 1.0) == math.inf
    assert math.isnan(removal_ratio(1.0, 1.0, 0.9))
    # copied experts differ in the last bits only: no rise, no ratio
    assert math.isnan(removal_ratio(3.4829, 3.4829 + 3e-7, 3.4829 - 2e-7))


# ---- routing statistics of a real (tiny) model ------------------------------------------------


def test_routing_statistics_agree_with_the_capture(tiny_cfg, tiny_bert_dir):
    workload = server_workload(tiny_cfg)
    model, data = workload.model, workload.test
    groups = np.asarray(data.labels)
    stats = collect_routing(model, data, groups, len(workload.label_names), batch_size=16)
    L, E = ExpertModel(model).shape
    assert stats.load_LE.shape == (L, E) and stats.gates_LSE.shape == (L, len(data), E)
    # every real token is assigned to top-k experts in every layer
    assert stats.load_LE.sum(1).tolist() == [2.0 * stats.tokens] * L
    torch.testing.assert_close(stats.joint_LGE.sum(1), stats.load_LE)
    assert float(stats.tokens_G.sum()) == stats.tokens
    assert float(stats.entropy_L.min()) > 0 and float(stats.entropy_L.max()) <= 1
    torch.testing.assert_close(stats.usage().sum(-1), torch.ones(L), rtol=0, atol=1e-5)
    # upcycled experts are copies of one FFN: removing one changes nothing (why every method
    # ties on upcycled models); perturbed copies are not interchangeable
    first = [removal_mask((L, E), [0] * L)]  # expert 0 of every MoE layer
    full, without = losses_without(model, data, first, 16)
    assert without == pytest.approx(full, abs=1e-5)
    noisy = server_workload(validate(tiny_raw(tiny_bert_dir, model={"expert_noise_std": 0.5})))
    noisy_full, noisy_without = losses_without(noisy.model, data, first, 16)
    assert noisy_without != noisy_full  # a random head: small


def test_removal_scores_multiple_choice_by_its_answer_loss_alone(tiny_llama_dir):
    raw = tiny_raw(
        tiny_llama_dir,
        data={"dataset": "qa_mix", "task": "multiple-choice", "max_examples_per_group": 60,
              "max_test_examples": 12, "partitioner": "iid"},
    )  # fmt: skip
    raw["model"]["max_length"] = 48
    workload = server_workload(validate(raw))
    scored = evaluate(workload.model, workload.test, 8)  # every choice scored, and the loss
    assert loss_with(workload.model, workload.test, None, 8) == pytest.approx(scored.loss)


# ---- does a selection hit the experts that matter (why the methods differ) ----------------------


def test_a_clients_last_updates_by_hand():
    rounds = [
        {"round": 0, "clients": []},
        {"round": 1, "clients": [{"partition_id": 0, "expert_updates": [1, 0, 0, 2]},
                                 {"partition_id": 1, "expert_updates": None}]},
        {"round": 2, "clients": [{"partition_id": 0, "expert_updates": [0, 3, 0, 0]}]},
    ]  # fmt: skip
    last = last_updates(rounds, (2, 2))
    assert set(last) == {0}  # client 1 recorded no updates
    assert last[0].tolist() == [[False, True], [False, False]]  # its last round, not its first


def test_only_layers_with_an_expert_left_are_removed_and_random_draws_match_the_count():
    updated = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    removed = removable(updated)
    assert removed.tolist() == [[False] * 3, [True, False, True], [False] * 3]
    drawn = random_like(removed, np.random.default_rng(0))
    assert drawn.sum(1).tolist() == [0, 2, 0]


def test_the_pooled_ratio_sums_the_rises_over_clients():
    rows = [
        {"loss": 1.0, "loss_without_selected": 1.5, "loss_without_random": 1.1},
        {"loss": 2.0, "loss_without_selected": 2.1, "loss_without_random": 1.9},  # ratio -1
    ]
    assert math.isnan(pooled_ratio(rows))  # random removals: +0.1 and -0.1, no rise in all
    rows[1]["loss_without_random"] = 2.3  # rises: selected 0.5 + 0.1, random 0.1 + 0.3
    assert pooled_ratio(rows) == pytest.approx(1.5)


def test_selection_cost_removes_what_each_client_updated(tiny_bert_dir):
    cfg = validate(tiny_raw(tiny_bert_dir, model={"expert_noise_std": 0.5}))
    workload = server_workload(cfg)
    L, E = ExpertModel(workload.model).shape
    part, whole = [1, 0, 0, 0] * L, [1] * (L * E)
    rounds = [{"round": 1, "clients": [{"partition_id": 0, "expert_updates": part},
                                       {"partition_id": 1, "expert_updates": whole}]}]  # fmt: skip
    train = load_dataset(cfg.data, cfg.seed).train
    rows = selection_cost(
        cfg, workload.model, workload.tokenizer, train, rounds, (L, E), np.random.default_rng(0),
        cap=8,
    )  # fmt: skip
    assert [r["partition"] for r in rows] == [0]  # client 1 updated every expert: no removal
    row = rows[0]
    assert row["experts_removed"] == L and row["examples"] == 8
    allowed = torch.tensor(part).reshape(L, E) == 0
    # client 0's first 8 training examples
    data = tokenize_for(cfg, train.subset(partitions(cfg, train, 2)[0][:8]), workload.tokenizer)
    assert row["loss"] == pytest.approx(loss_with(workload.model, data, None, 32))
    assert row["loss_without_selected"] == pytest.approx(
        loss_with(workload.model, data, allowed, 32)
    )
    assert row["loss_without_selected"] != pytest.approx(row["loss"])  # the removal took effect
    assert row["ratio"] == pytest.approx(
        removal_ratio(row["loss"], row["loss_without_selected"], row["loss_without_random"]),
        nan_ok=True,
    )


def _raw(model_dir, **model) -> dict:
    """A tiny config on the model; a decoder's on multiple-choice questions (40 test ones)."""
    raw = tiny_raw(model_dir, model=model)
    if "llama" in model_dir.name:
        raw["data"] |= {"dataset": "qa_mix", "task": "multiple-choice", "partitioner": "iid",
                        "max_examples_per_group": 60}  # fmt: skip
        raw["model"]["max_length"] = 48
    return raw


@pytest.mark.parametrize("model_dir", ["tiny_llama_dir", "tiny_bert_dir"])
def test_losses_without_replay_the_blocks_before_the_first_moe_block_bit_for_bit(
    model_dir, request
):
    """The passes after the first reuse what the blocks before the first MoE block returned
    (those blocks do not run again), and give the same losses as passes run whole."""
    model_dir = request.getfixturevalue(model_dir)
    workload = server_workload(validate(_raw(model_dir, expert_noise_std=0.5, moe_layers=[1])))
    model, data = workload.model, workload.test
    blocks = blocks_before_first_moe(model)
    assert len(blocks) == 1  # block 0; block 1 is the MoE block
    L, E = ExpertModel(model).shape
    removals = [torch.eye(E, dtype=torch.bool)[[e]].expand(L, E) for e in range(E)]
    calls = []
    blocks[0].register_forward_hook(lambda *_: calls.append(1))
    submodule = next(iter(blocks[0].children()))
    inner = []
    submodule.register_forward_hook(lambda *_: inner.append(1))
    losses = losses_without(model, data, removals, batch_size=16)  # 3 batches of 40
    assert len(inner) == 3  # the prefix's insides ran in the recorded pass only
    assert len(calls) == 3 * (1 + E)  # the block is still called; its stand-in answers
    whole = [loss_with(model, data, None, 16)] + [loss_with(model, data, ~r, 16) for r in removals]
    assert losses == whole  # bit for bit
    assert len(set(losses)) > 1  # the removals took effect


def test_a_model_whose_first_block_is_an_moe_block_has_no_prefix(tiny_bert_dir):
    model = server_workload(validate(tiny_raw(tiny_bert_dir))).model
    assert ExpertModel(model).layers[0].name.split(".")[-2] == "0"  # every layer is MoE
    prefix = BlockPrefix(model)
    assert prefix.blocks == []
    with prefix.recording(), prefix.replaying():
        pass  # plain passes


def test_a_replayed_pass_must_cover_the_recorded_batches(tiny_llama_dir):
    workload = server_workload(validate(_raw(tiny_llama_dir, moe_layers=[2])))
    model, data = workload.model, workload.test
    prefix = BlockPrefix(model)
    with prefix.recording():
        loss_with(model, data, None, 16)  # 3 batches: 16, 16, 8
    with pytest.raises(RuntimeError, match="replayed 1 of 3 recorded batches"), prefix.replaying():
        loss_with(model, data.subset(range(16)), None, 16)
    with pytest.raises(RuntimeError, match=r"batch 0 has shape \(8, "), prefix.replaying():
        loss_with(model, data, None, 8)
    with prefix.recording():
        loss_with(model, data.subset(range(16)), None, 16)
    with (
        pytest.raises(RuntimeError, match="more batches than the one recorded"),
        prefix.replaying(),
    ):
        loss_with(model, data, None, 16)
    assert "forward" not in blocks_before_first_moe(model)[0].__dict__  # the blocks restored


# ---- the command -------------------------------------------------------------------------------


def test_analyze_an_initial_model_and_a_finished_run(tiny_bert_dir, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(tiny_raw(tiny_bert_dir, federation={"rounds": 1})))
    out = tmp_path / "initial"
    proc = invoke_cli("analyze", "--config", str(config), "-o", str(out), "--max-examples", "20")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "specialisation.json").read_text())
    assert report["by"] == "label" and report["examples"] == 20
    assert len(report["layers"]) == 2 and len(report["clients"]["usage"]) == 2
    shares = np.asarray(report["shares"])  # (L, G, E): rows sum to top-k
    assert shares.shape == (2, len(report["groups"]), 4)
    np.testing.assert_allclose(shares.sum(-1), 2.0)
    assert {r["group"] for r in report["removal"]} <= set(report["groups"])
    assert set(report["summary"]) == {
        "max_entropy",
        "mean_nmi",
        "mean_load_cv",
        "clients_jsd",
        "median_removal_ratio",
    }
    assert (out / "shares.png").stat().st_size > 1000
    assert "| layer | top-k |" in (out / "specialisation.md").read_text()

    run_dir = tmp_path / "run"
    assert invoke_cli("run", str(config), "-o", str(run_dir), "--no-progress").returncode == 0
    proc = invoke_cli("analyze", str(run_dir), "--max-examples", "20")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "analysis" / "specialisation.json").read_text())
    assert isinstance(report["selection"], list)  # a run's analysis measures its selections
    assert "pooled_selection_ratio" in report["summary"]
    alone = json.loads((run_dir / "analysis" / "selection.json").read_text())
    assert alone["selection"] == report["selection"]  # where the comparison report reads it
    (run_dir / "analysis" / "selection.json").unlink()
    proc = invoke_cli("analyze", str(run_dir), "--selection-only")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "analysis" / "selection.json").read_text()) == alone


def test_analyze_input_errors_are_one_line(tiny_bert_dir, tmp_path):
    proc = invoke_cli("analyze", str(tmp_path))
    assert proc.returncode == 2 and "--config: needed unless PATH is a run directory" in proc.stderr
    proc = invoke_cli("analyze", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(tiny_raw(tiny_bert_dir)))
    proc = invoke_cli("analyze", "--config", str(config), "--by", "group")
    assert proc.returncode == 2 and "--by group: this data set has no groups" in proc.stderr
    proc = invoke_cli("analyze", "--config", str(config), "--selection-only")
    assert proc.returncode == 2 and "--selection-only: PATH must be a finished run" in proc.stderr


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_token_routing_of_every_family_matches_its_routed_set(family):
    """RoutingCapture.tokens: one row per real token, each choosing top-k experts, on fused,
    per-module and encoder-decoder (Switch) models alike."""
    model, batch = families.build(family).eval(), families.batch(family)
    em = ExpertModel(model)
    with torch.no_grad(), em.capture() as capture:
        model(**batch)
    mask = batch["attention_mask"]
    routed_LE = capture.routed(mask)
    for layer, (probs_NE, chosen_NE, sample_N) in zip(em.layers, capture.tokens(mask), strict=True):
        assert probs_NE.shape == chosen_NE.shape and len(sample_N) == len(probs_NE)
        torch.testing.assert_close(probs_NE.sum(-1), torch.ones(len(probs_NE)))
        assert set(sample_N.tolist()) <= {0, 1}
        assert torch.equal(chosen_NE.any(0), routed_LE[layer.position])
        if layer.kind == "topk":
            assert chosen_NE.sum(-1).tolist() == [layer.top_k] * len(chosen_NE)
