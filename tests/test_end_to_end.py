"""End to end through the real CLI: 2 rounds x 2 clients of FedAvg on a tiny upcycled model,
real BBC News data, the Flower ServerApp and ClientApp on the embedded engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
import torch

from hfedmoe.federation.workload import server_workload
from hfedmoe.foundation.config import load
from hfedmoe.model import load_checkpoint
from hfedmoe.results import read_metrics, without
from hfedmoe.results.run_state import code_digest
from hfedmoe.training import evaluate

from .support.cli import run_cli
from .support.configs import tiny_raw


@pytest.fixture(scope="module")
def config_file(tiny_bert_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text(tomli_w.dumps(tiny_raw(tiny_bert_dir)))
    return path


@pytest.fixture(scope="module")
def finished_run(config_file, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "first"
    proc = run_cli("run", str(config_file), "--output-dir", str(run_dir), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"Results: {run_dir}" in proc.stdout
    return run_dir


def test_run_writes_every_output(finished_run):
    names = {p.name for p in finished_run.iterdir()}
    assert {
        "config.toml",
        "metrics.jsonl",
        "metrics.csv",
        "clients.csv",
        "accuracy.png",
        "model",
        "summary.json",
    } <= names
    assert (finished_run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (finished_run / "accuracy.png").stat().st_size > 10_000


def test_metrics_have_one_sensible_record_per_round(finished_run):
    records = read_metrics(finished_run)
    assert [r["round"] for r in records] == [0, 1, 2]  # round 0 = the initial model
    for r in records[1:]:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["test_loss"] > 0
        assert r["clients_ok"] == 2 and r["clients_failed"] == 0
        assert len(r["clients"]) == 2
        for c in r["clients"]:
            assert c["status"] == "ok" and c["train_loss"] > 0 and c["seconds"] > 0
            assert c["num_examples"] > 0
            # FedAvg: the whole model both ways; up also carries the (L=2, E=4) int64 update
            # counts, a .npy array of 128 header bytes + 64 data bytes
            assert c["bytes_up"] == c["bytes_down"] + 128 + 2 * 4 * 8 > 0
            assert 0 < c["experts_updated"] <= 2 * 4
            assert 2 * 2 <= c["experts_routed_per_step"] <= 2 * 4  # top-2 in each of 2 layers
        assert r["examples"] == sum(c["num_examples"] for c in r["clients"])
        assert r["bytes_down"] == sum(c["bytes_down"] for c in r["clients"])
    csv_lines = (finished_run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("round,test_accuracy,test_loss")
    assert len(csv_lines) == 1 + 3
    assert len((finished_run / "clients.csv").read_text().splitlines()) == 1 + 2 * 2


def test_saved_config_reproduces_the_run_config(finished_run, config_file):
    assert load(finished_run / "config.toml") == load(config_file)


def test_checkpoint_reloads_and_reproduces_the_final_evaluation(finished_run):
    model, _ = load_checkpoint(finished_run / "model")
    test = server_workload(load(finished_run / "config.toml")).test
    result = evaluate(model, test, batch_size=16)
    last = read_metrics(finished_run)[-1]
    assert result.accuracy == pytest.approx(last["test_accuracy"], abs=1e-9)
    assert result.loss == pytest.approx(last["test_loss"], rel=1e-5)
    again, _ = load_checkpoint(finished_run / "model")
    batch = test.batch(list(range(4)))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)


def test_same_config_and_seed_give_the_same_metrics(finished_run, config_file, tmp_path):
    proc = run_cli("run", str(config_file), "-o", str(tmp_path / "again"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert without(read_metrics(tmp_path / "again")) == without(read_metrics(finished_run))


def test_lora_run_uploads_only_adapters_and_reloads(tiny_bert_dir, tmp_path):
    """FedAvg over LoRA adapters (experts + attention) and the full classification head; each
    client builds the frozen base itself."""
    raw = tiny_raw(tiny_bert_dir, federation={"rounds": 1})
    raw["model"]["lora"] = {"rank": 2, "targets": ["experts", "attention"]}
    config = tmp_path / "lora.toml"
    config.write_text(tomli_w.dumps(raw))
    run_dir = tmp_path / "lora"
    proc = run_cli("run", str(config), "-o", str(run_dir), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    (record,) = read_metrics(run_dir)[1:]
    full = sum(
        t.numel() * t.element_size() for t in server_workload(load(config)).model.parameters()
    )
    for c in record["clients"]:  # adapters + head, both ways: the frozen base never travels
        assert 0 < c["bytes_down"] < full / 20
        assert abs(c["bytes_up"] - c["bytes_down"]) < 1024  # the same tensors, plus statistics
    model, _ = load_checkpoint(run_dir / "model")
    result = evaluate(model, server_workload(load(config)).test, batch_size=16)
    assert result.accuracy == pytest.approx(record["test_accuracy"], abs=1e-9)


def test_summary_matches_the_last_round(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    last = read_metrics(finished_run)[-1]
    assert summary["final_test_accuracy"] == last["test_accuracy"]
    assert summary["rounds"] == 2
    assert summary["code"] == code_digest()  # what produced it, to rerun it by
    assert summary["machine"]["torch"] == torch.__version__
    assert summary["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_setting_b_rotten_tomatoes_by_movie(tiny_bert_dir, tmp_path):
    """Setting (b) of the comparison on the tiny model: clients are runs of whole movies."""
    raw = tiny_raw(tiny_bert_dir, algorithm="hfedmoe", federation={"rounds": 1})
    raw["data"] = {"dataset": "rotten_tomatoes", "partitioner": "natural", "max_test_examples": 40}
    config = tmp_path / "b.toml"
    config.write_text(tomli_w.dumps(raw))
    proc = run_cli("run", str(config), "-o", str(tmp_path / "b"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    _, record = read_metrics(tmp_path / "b")
    assert record["clients_ok"] == 2 and 0 <= record["test_accuracy"] <= 1


def test_setting_c_multiple_choice_reports_accuracy_per_task_and_reloads(tiny_llama_dir, tmp_path):
    """Setting (c) on the tiny decoder: answers scored by likelihood, accuracy per task in the
    metrics, and the saved checkpoint scores the same."""
    raw = tiny_raw(tiny_llama_dir, algorithm="hfedmoe", federation={"rounds": 1})
    raw["model"]["max_length"] = 48
    raw["data"] = {
        "dataset": "qa_mix",
        "task": "multiple-choice",
        "partition_by": "group",
        "dirichlet_alpha": 0.1,
        "max_examples_per_group": 30,
        "min_partition_size": 5,
    }
    config = tmp_path / "c.toml"
    config.write_text(tomli_w.dumps(raw))
    proc = run_cli("run", str(config), "-o", str(tmp_path / "c"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    _, record = read_metrics(tmp_path / "c")
    by_task = record["test_accuracy_by_group"]
    assert set(by_task) == {"boolq", "commonsenseqa", "piqa", "siqa"}
    assert record["test_accuracy"] == pytest.approx(sum(by_task.values()) / 4)  # 6 per task
    model, _ = load_checkpoint(tmp_path / "c" / "model")
    result = evaluate(model, server_workload(load(config)).test, batch_size=7)
    assert result.accuracy == pytest.approx(record["test_accuracy"], abs=1e-9)
