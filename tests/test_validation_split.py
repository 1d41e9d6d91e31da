"""The validation split (``data.validation_fraction``): rows held out of the training split, by
stratum and seed, that no client trains on; the server evaluates the global model on them every
round beside the test split. The test split and the specialisation corpus stay as they were."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from hfedmoe.data.datasets import hold_out_validation, load_dataset, read_dataset, split_rows
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.experiment.report import write_report
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import _round_record
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.federation.workload import client_source, partitions, server_workload
from hfedmoe.foundation.config import DataConfig, validate
from hfedmoe.foundation.errors import ConfigError, HFedMoEError
from hfedmoe.results import read_metrics
from hfedmoe.results.recorder import ROUND_COLUMNS, VALIDATION_COLUMNS
from hfedmoe.training import EvalResult

from .support.configs import tiny_raw
from .support.guards import time_limit

# ---- the rows, by hand -------------------------------------------------------------------------


def test_the_validation_rows_by_hand():
    """Row ids, not positions: 0.2 of each stratum of the training rows (2 of the ten 0s,
    round(0.2 x 5) = 1 of the five 1s), the rest left to train."""
    strata = np.arange(20) % 2  # even rows are 0s, odd rows 1s
    train = np.array([0, 2, 4, 6, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19])  # ten 0s, five 1s
    kept, held = hold_out_validation(train, strata, DataConfig(validation_fraction=0.2), seed=0)
    assert np.bincount(strata[held]).tolist() == [2, 1]
    assert set(held) <= set(train) and not set(held) & set(kept)
    assert sorted([*kept, *held]) == sorted(train)
    assert list(kept) == sorted(kept) and list(held) == sorted(held)  # as the training rows


def test_no_fraction_holds_out_nothing():
    train = np.array([3, 1, 2])
    kept, held = hold_out_validation(train, np.zeros(4, dtype=np.int64), DataConfig(), seed=0)
    assert kept is train and len(held) == 0
    assert load_dataset(DataConfig(max_train_examples=50), seed=0).validation is None


# ---- on the shipped data sets ------------------------------------------------------------------

SHIPPED = {
    "bbc_news": {"dataset": "bbc_news", "max_train_examples": 600},
    "qa_mix": {
        "dataset": "qa_mix",
        "task": "multiple-choice",
        "max_examples_per_group": 300,
        "partition_by": "group",
    },
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_the_validation_split_shrinks_only_the_training_rows(name):
    """With the corpus held out too: the validation rows are disjoint from every client's
    partition, the test split and the corpus; with the partitions they are the training rows
    of the run without them; the test split and the corpus are that run's."""
    data = {**SHIPPED[name], "holdout_fraction": 0.1}
    without = DataConfig(**data)
    full = read_dataset(without)
    strata = full.groups if full.choices is not None else full.labels
    for seed in (0, 1):
        before = split_rows(full, without, seed)
        after = split_rows(full, DataConfig(**data, validation_fraction=0.1), seed)
        assert np.array_equal(after.test, before.test)
        assert np.array_equal(after.holdout, before.holdout)
        validation = set(after.validation)
        assert not validation & set(after.test) and not validation & set(after.holdout)
        run = validate({"seed": seed, "data": data | {"validation_fraction": 0.1}})
        parts = [after.train[p] for p in partitions(run, full.subset(after.train), 8)]
        assert all(not validation & set(p) for p in parts)
        assert sorted([*validation, *np.concatenate(parts)]) == before.train.tolist()
        for s in np.unique(strata[before.train]):  # every label (task) at its share
            share = np.mean(strata[after.validation] == s)
            assert share == pytest.approx(np.mean(strata[before.train] == s), abs=0.02)


def test_every_qa_mix_task_is_in_the_validation_split():
    full = read_dataset(DataConfig(**SHIPPED["qa_mix"]))
    split = load_dataset(DataConfig(**SHIPPED["qa_mix"], validation_fraction=0.05), seed=0)
    assert split.validation is not None and split.validation.choices is not None
    assert set(split.validation.groups) == set(range(len(full.group_names)))
    assert np.bincount(split.validation.groups).tolist() == [12] * 4  # 5% of 240 per task


def test_the_seed_fixes_the_validation_split():
    cfg = DataConfig(max_train_examples=300, validation_fraction=0.2)
    full = read_dataset(cfg)
    draws = [split_rows(full, cfg, seed).validation for seed in (0, 0, 1)]
    assert np.array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])


def test_a_local_multiple_choice_file_keeps_every_task(tmp_path):
    """Three tasks of 10 questions, a test file of their own: 0.2 of each task validates."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    for path, n in ((train, 10), (test, 2)):
        rows = [
            {"question": f"{task} {i}?", "choices": ["yes", "no"], "answer": i % 2, "task": task}
            for task in ("add", "capital", "spell")
            for i in range(n)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        dataset="local",
        task="multiple-choice",
        path=str(train),
        test_path=str(test),
        columns={"group": "task"},
        validation_fraction=0.2,
    )
    split = load_dataset(cfg, seed=0)
    assert split.validation is not None
    assert np.bincount(split.validation.groups).tolist() == [2, 2, 2]
    assert np.bincount(split.train.groups).tolist() == [8, 8, 8]
    assert len(split.test) == 6  # the test file, whole
    assert not set(split.validation.texts) & set(split.train.texts)


# ---- config errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_a_fraction_outside_zero_one_names_the_key(value):
    with pytest.raises(ConfigError, match=r"^data\.validation_fraction: "):
        validate({"data": {"validation_fraction": value}})


def test_a_fraction_that_holds_out_no_row_names_the_key():
    cfg = DataConfig(max_train_examples=20, validation_fraction=0.01)
    with pytest.raises(HFedMoEError, match=r"^data\.validation_fraction: 0\.01 of the 20 "):
        load_dataset(cfg, seed=0)


# ---- the records --------------------------------------------------------------------------------


def test_a_round_record_names_the_validation_metrics_as_the_test_metrics():
    """Language modelling of a grouped set: each test key has its validation twin, right after
    the test keys; without a validation result the record is what it always was."""
    test = EvalResult(0.5, 2.0, 10, {"a": 0.4}, {"a": 2.1}, 7.39)
    validation = EvalResult(0.25, 3.0, 4, {"a": 0.25}, {"a": 3.0}, 20.1)
    plain = _round_record(1, test, 1.5, [], 0.1, 0.2)
    record = _round_record(1, test, 1.5, [], 0.1, 0.2, validation)
    test_keys = [k for k in plain if k.startswith("test_")]
    assert test_keys == [
        "test_accuracy",
        "test_loss",
        "test_accuracy_by_group",
        "test_loss_by_group",
        "test_perplexity",
    ]
    added = [k for k in record if k not in plain]
    assert added == [k.replace("test_", "validation_") for k in test_keys]
    assert list(record)[1 + len(test_keys) :][: len(added)] == added
    assert [record[k] for k in added] == [0.25, 3.0, {"a": 0.25}, {"a": 3.0}, 20.1]
    assert {k: v for k, v in record.items() if k not in added} == plain


# ---- real runs ---------------------------------------------------------------------------------

VALIDATION_KEYS = {"validation_accuracy", "validation_loss", "validation_seconds"}


def test_the_server_knows_the_partitions_the_clients_build(tiny_bert_dir):
    """The sizes the server checks the clients' declarations against are those of the
    partitions the clients cut from the training rows the validation split leaves; a quarter of
    the 120 training rows validate (rounded per label, 30 here)."""
    cfg = validate(tiny_raw(tiny_bert_dir, data={"validation_fraction": 0.25}))
    workload = server_workload(cfg)
    source = client_source(cfg, cfg.federation.num_clients)
    assert workload.partition_sizes == tuple(len(p) for p in source.parts)
    assert len(workload.validation) == 30 and sum(workload.partition_sizes) == 90  # of the 120


def _run(model_dir, run_dir, **data) -> list[dict]:
    with time_limit(600):  # a run that hangs fails instead
        run_embedded(validate(tiny_raw(model_dir, data=data)), str(run_dir), server_app, client_app)
    return read_metrics(run_dir)


def test_a_run_records_validation_metrics_beside_the_test_metrics(tiny_bert_dir, tmp_path):
    """Every round (0 too) has the validation metrics, metrics.csv their columns, summary.json
    the final and best; round 0's test metrics (the same initial model on the same test rows)
    are those of the run without a validation split, which records none of the new keys."""
    with_split = _run(tiny_bert_dir, tmp_path / "with", validation_fraction=0.25)
    without = _run(tiny_bert_dir, tmp_path / "without")
    for record in with_split:
        assert 0 <= record["validation_accuracy"] <= 1 and record["validation_loss"] > 0
        assert ("validation_seconds" in record) == (record["round"] > 0)
        assert record["clients_ok"] == (2 if record["round"] else 0)
    assert "excluded" not in with_split[0]  # every client declared the partition the server knows
    assert all(not VALIDATION_KEYS & set(r) for r in without)
    for key in ("test_accuracy", "test_loss"):
        assert with_split[0][key] == without[0][key]

    with open(tmp_path / "with" / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:5] == ["round", "test_accuracy", "test_loss", *VALIDATION_COLUMNS]
    assert set(header) == {*ROUND_COLUMNS, *VALIDATION_COLUMNS}
    with open(tmp_path / "without" / "metrics.csv", newline="") as f:
        assert next(csv.reader(f)) == ROUND_COLUMNS

    summary = json.loads((tmp_path / "with" / "summary.json").read_text())
    accuracy = [r["validation_accuracy"] for r in with_split]
    assert summary["final_validation_accuracy"] == accuracy[-1]
    assert summary["final_validation_loss"] == with_split[-1]["validation_loss"]
    assert summary["best_validation_accuracy"] == max(accuracy)
    assert summary["best_validation_round"] == accuracy.index(max(accuracy))
    plain = json.loads((tmp_path / "without" / "summary.json").read_text())
    assert not any("validation" in key for key in plain)

    report = write_report(
        [tmp_path / "with", tmp_path / "without"], tmp_path / "report", {"target": 0.5}
    )
    assert report.is_file()


def test_multiple_choice_validates_every_task(tiny_llama_dir, tmp_path):
    """qa_mix on the tiny decoder: the validation accuracy per task, every task, every round."""
    raw = tiny_raw(tiny_llama_dir, federation={"rounds": 1})
    raw["model"]["max_length"] = 48
    raw["data"] = {
        "dataset": "qa_mix",
        "task": "multiple-choice",
        "partitioner": "iid",
        "max_examples_per_group": 30,  # 24 training questions a task, 6 of them validate
        "validation_fraction": 0.25,
    }
    run_dir = tmp_path / "qa"
    with time_limit(600):
        run_embedded(validate(raw), str(run_dir), server_app, client_app)
    for record in read_metrics(run_dir):
        by_task = record["validation_accuracy_by_group"]
        assert set(by_task) == {"boolq", "commonsenseqa", "piqa", "siqa"}
        assert record["validation_accuracy"] == pytest.approx(sum(by_task.values()) / 4)
