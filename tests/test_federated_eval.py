"""Federated evaluation (``eval.mode``): each client evaluates the global model on its own
held-out share and the server records each value and their weighted mean, round 0 included;
answers are checked like any reply; a server with no test data runs on it alone.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
from flwr.app import Message, MessageType
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from hfedmoe.data.partition import client_test_split, held_out_count
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation import wire
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.evaluation import held_out_sizes
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.federation.workload import client_model, client_source, label_names
from hfedmoe.foundation.config import validate
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.model.state import load_shared_state
from hfedmoe.results import read_metrics
from hfedmoe.training import evaluate

from .support.configs import tiny_raw
from .test_own_data import _raw as own_raw

# --- the held-out share, by hand -------------------------------------------------------------


def test_the_held_out_share_by_hand():
    assert held_out_count(20, 0.25) == 5
    assert held_out_count(3, 0.1) == 1  # at least one
    assert held_out_count(1, 0.5) == 0  # never every row
    assert held_out_count(20, 0.0) == 0
    train, held = client_test_split(20, 0.25, seed=0, client=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted([*train, *held]) == list(range(20))
    again = client_test_split(20, 0.25, seed=0, client=3)[1]
    assert held.tolist() == again.tolist()  # the same on the client and the server
    assert held.tolist() != client_test_split(20, 0.25, seed=0, client=4)[1].tolist()
    # what a client that trains on 15 rows holds out at 0.25: 20 rows (5 out) is the only
    # size; 19 rows hold out round(4.75) = 5 (14 left), 21 round(5.25) = 5 (16 left)
    assert held_out_sizes(15, 0.25) == {5}
    # at 0.3, 3 rows train on 3 - 1 (4 rows: 4 - 1 = 3; 5 rows: 5 - 2 = 3): 1 or 2 held out
    assert held_out_sizes(3, 0.3) == {1, 2}


def _held_out_sizes_by_search(trained: int, fraction: float) -> set[int]:
    """Every size from ``trained`` up, until N - held_out_count(N) passes ``trained``."""
    sizes, rows = set(), trained
    while rows - (held := held_out_count(rows, fraction)) <= trained:
        if rows - held == trained:
            sizes.add(held)
        rows += 1
    return sizes


@given(st.integers(0, 3000), st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.3, 0.5, 2 / 3, 0.9, 0.99]))
def test_the_held_out_sizes_are_those_a_search_of_every_size_finds(trained, fraction):
    assert held_out_sizes(trained, fraction) == _held_out_sizes_by_search(trained, fraction)


def test_a_huge_declared_size_costs_the_server_no_time():
    # the sizes are searched in a window of a few rows, not counted up to a node's claim
    assert held_out_sizes(10**15, 0.25) == {333_333_333_333_333, 333_333_333_333_334}


# --- a run ----------------------------------------------------------------------------------


def _run(tiny_bert_dir, run_dir, client=client_app, **evaluation):
    raw = tiny_raw(
        tiny_bert_dir,
        federation={"num_clients": 3, "clients_per_round": 2, "rounds": 2},
        data={"client_test_fraction": 0.25},
        eval={"mode": "both", **evaluation},
    )
    cfg = validate(raw)
    run_embedded(cfg, str(run_dir), server_app, client)
    return cfg, read_metrics(run_dir)


@pytest.fixture(scope="module")
def both(tiny_bert_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fed") / "run"
    cfg, metrics = _run(tiny_bert_dir, run_dir)
    return cfg, metrics, run_dir


def test_every_client_evaluates_in_round_0_and_the_last_the_sampled_ones_between(both):
    _, metrics, _ = both
    asked = [sorted(c["partition_id"] for c in r["federated_clients"]) for r in metrics]
    sampled = sorted(c["partition_id"] for c in metrics[1]["clients"])
    assert asked == [[0, 1, 2], sampled, [0, 1, 2]]
    for record in metrics:
        clients = record["federated_clients"]
        n = sum(c["examples"] for c in clients)
        assert record["federated_examples"] == n
        mean = sum(c["accuracy"] * c["examples"] for c in clients) / n
        assert record["federated_accuracy"] == pytest.approx(mean, abs=1e-12)
        assert record["federated_failures"] == {}
        assert "test_accuracy" in record  # "both": the central evaluation too
        # per-client accuracy is what each client said (absent for a client not asked)
        said = {c["partition_id"]: c["accuracy"] for c in clients}
        assert record["personal_accuracy"] == [said.get(i) for i in range(3)]


def test_a_clients_value_is_the_final_model_on_its_own_held_out_rows(both, tmp_path):
    cfg, metrics, run_dir = both
    model = client_model(cfg, label_names(cfg))
    load_shared_state(model, load_file(run_dir / "model" / "model.safetensors"))
    source = client_source(cfg, 3)
    for said in metrics[-1]["federated_clients"]:
        data = source.partition(cfg, said["partition_id"], held_out=True)
        result = evaluate(model, data, cfg.eval.batch_size)
        assert said["examples"] == len(data)
        assert said["accuracy"] == pytest.approx(result.accuracy, abs=1e-9)
        assert said["loss"] == pytest.approx(result.loss, rel=1e-5)


def test_a_client_trains_on_its_rows_less_the_held_out_share(both):
    cfg, metrics, _ = both
    source = client_source(cfg, 3)
    for device in metrics[0]["devices"]:
        pid = device["partition_id"]
        trained = len(source.partition(cfg, pid))
        held = len(source.partition(cfg, pid, held_out=True))
        assert device["num_examples"] == trained
        assert held == held_out_count(trained + held, 0.25)


def _lying(**changes):
    """The real client app, except that client 1 answers every evaluation with ``changes``
    to its honest answer."""

    def client(msg: Message, context):
        reply = client_app(msg, context)
        if msg.metadata.message_type != MessageType.EVALUATE:
            return reply
        if int(context.node_config["partition-id"]) != 1:
            return reply
        honest = wire.unpack_evaluation(reply.content)
        lie = wire.ClientEvaluation(**{**asdict(honest), **changes})
        return Message(wire.pack_evaluation(lie), reply_to=msg)

    return client


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"accuracy": 5.0}, "malformed"),
        ({"loss": float("inf")}, "malformed"),
        ({"examples": 10**9}, "examples"),
        ({"partition_id": 0}, "client"),
    ],
)
def test_a_lying_evaluation_is_left_out_and_the_run_goes_on(
    tiny_bert_dir, tmp_path, changes, reason
):
    _, metrics = _run(
        tiny_bert_dir, tmp_path / "run", client=_lying(**changes), federated_clients="all"
    )
    for record in metrics:
        assert record["federated_failures"] == {reason: 1}
        assert sorted(c["partition_id"] for c in record["federated_clients"]) == [0, 2]


def test_a_server_without_test_data_runs_on_federated_evaluation_alone(tiny_bert_dir, tmp_path):
    raw = own_raw(tiny_bert_dir, test_path=None, client_test_fraction=0.3)
    raw["eval"] = {"mode": "federated"}
    cfg = validate(raw)
    run_embedded(cfg, str(tmp_path / "run"), server_app, client_app)
    metrics = read_metrics(tmp_path / "run")
    for record in metrics:
        assert record["test_accuracy"] == record["federated_accuracy"]
        assert record["test_loss"] == record["federated_loss"]
    assert len(metrics[-1]["federated_clients"]) == 3


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"eval": {"mode": "both"}}, r"data\.client_test_fraction: expected more than 0"),
        ({"eval": {"mode": "bogus"}}, r"eval\.mode"),
    ],
)
def test_federated_evaluation_without_a_share_is_one_clear_error(tiny_bert_dir, changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate(tiny_raw(tiny_bert_dir, **changes))


def test_flex_moe_clients_evaluate_their_own_routers_too(tiny_bert_dir, tmp_path):
    """FLEX-MoE keeps each client's routers on its node: with federated evaluation each client
    also measures its personal model on its own rows, and that is the per-client view."""
    raw = tiny_raw(
        tiny_bert_dir,
        algorithm="flexmoe",
        federation={"num_clients": 3, "clients_per_round": 3, "rounds": 2},
        data={"client_test_fraction": 0.25},
        eval={"mode": "both"},
    )
    run_embedded(validate(raw), str(tmp_path / "run"), server_app, client_app)
    metrics = read_metrics(tmp_path / "run")
    assert "personal_model_accuracy" not in metrics[0]  # no node keeps routers before round 1
    for record in metrics[1:]:
        said = {c["partition_id"]: c for c in record["federated_clients"]}
        assert all("personal_accuracy" in c for c in said.values())  # all trained in round 1
        assert record["personal_model_accuracy"] == [said[i]["personal_accuracy"] for i in range(3)]
        assert record["personal_accuracy"] == [said[i]["accuracy"] for i in range(3)]


def test_a_personal_value_out_of_range_is_left_out(tiny_bert_dir, tmp_path):
    honest = wire.ClientEvaluation(1, 0.5, 1.0, 4, personal_accuracy=0.6, personal_loss=0.9)
    assert wire.unpack_evaluation(wire.pack_evaluation(honest)) == honest
    for bad in ({"personal_accuracy": 2.0}, {"personal_loss": -1.0}):
        lie = wire.ClientEvaluation(**{**asdict(honest), **bad})
        with pytest.raises(ValueError, match="personal_"):
            wire.unpack_evaluation(wire.pack_evaluation(lie))
    half = wire.pack_evaluation(wire.ClientEvaluation(1, 0.5, 1.0, 4, personal_accuracy=0.6))
    with pytest.raises(ValueError, match="loss of the personal model missing"):
        wire.unpack_evaluation(half)
