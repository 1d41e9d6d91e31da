"""Client faults: whatever a client sends (or fails to send), the server rejects what is bad
with a reason, aggregates the rest, and never lets a bad update into the global model."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from hfedmoe.algorithms import ClientUpdate
from hfedmoe.algorithms.mechanics import validation
from hfedmoe.algorithms.mechanics.uploads import EXPERT_UPDATES, Statistic, UploadSpec
from hfedmoe.algorithms.mechanics.validation import Expectation, check_update
from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.faults import corrupt, planned_fault
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.foundation.config import ATTACK_KINDS, FAULT_KINDS, validate
from hfedmoe.results import read_metrics

from .support.configs import tiny_raw
from .support.guards import time_limit

UPDATE_FAULTS = ["nan", "inf", "shape", "dtype", "unknown-key", "missing-key", "norm"]

# --- the checks, by hand ---------------------------------------------------------------------

GLOBAL = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[0.0]]), "step": torch.tensor(7)}
SPEC = UploadSpec(frozenset({"a", "b"}))


def _check(weights, num_examples=10, ratio=10.0, spec=SPEC, stats=None, loss=1.0):
    metrics = {"train_loss": loss, "steps": 1}
    update = ClientUpdate(weights, num_examples, metrics=metrics, stats=stats or {})
    return check_update(
        update, spec, GLOBAL, Expectation(steps=1, max_update_ratio=ratio)
    ).rejection


def _counts(shape):
    """The per-expert update counts of an (L, E) pool, as the specs declare them."""
    return {"expert_updates": Statistic(EXPERT_UPDATES.range, shape=shape)}


def test_a_sound_update_is_accepted():
    assert _check({"a": torch.tensor([3.5, 4.0]), "b": torch.tensor([[1.0]])}) is None


@pytest.mark.parametrize(
    ("weights", "reason", "detail"),
    [
        ({"a": GLOBAL["a"], "b": GLOBAL["b"], "c": torch.zeros(1)}, "unknown-keys", "e.g. c"),
        ({"a": GLOBAL["a"]}, "missing-keys", "e.g. b"),
        ({"a": torch.zeros(3), "b": GLOBAL["b"]}, "shape", "a is (3,), expected (2,)"),
        ({"a": GLOBAL["a"].double(), "b": GLOBAL["b"]}, "dtype", "a is torch.float64"),
        ({"a": torch.tensor([math.nan, 4.0]), "b": GLOBAL["b"]}, "non-finite", "a holds NaN"),
        ({"a": torch.tensor([3.0, math.inf]), "b": GLOBAL["b"]}, "non-finite", "a holds NaN"),
    ],
)
def test_each_bad_update_is_rejected_with_its_reason(weights, reason, detail):
    rejection = _check(weights)
    assert rejection is not None and rejection.reason == reason and detail in rejection.detail


def test_the_norm_bound_is_relative_to_the_global_weights_by_hand():
    # ||w|| = ||(3, 4, 0)|| = 5; the update moves a by (0, 12) and b by 5: ||delta|| = 13
    weights = {"a": torch.tensor([3.0, 16.0]), "b": torch.tensor([[5.0]])}
    assert _check(weights, ratio=2.6) is None  # 13 <= 2.6 x 5
    rejection = _check(weights, ratio=2.5)  # 13 > 12.5
    assert rejection.reason == "norm" and "2.6 x their norm (limit 2.5)" in rejection.detail


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms_do_not_overflow(dtype):
    """||w|| = ||(300, 400) x 100,000 rows|| = 500 x sqrt(1e5) = 158,114, beyond float16's
    65,504, so the norms are taken in float32: adding (0, 100) to every row moves w by
    100 x sqrt(1e5), 0.2 x its norm."""
    w = {"a": torch.tensor([300.0, 400.0], dtype=dtype).repeat(100_000, 1)}
    spec = UploadSpec(frozenset({"a"}))
    moved = {"a": w["a"] + torch.tensor([0.0, 100.0], dtype=dtype)}
    update = ClientUpdate(moved, 10, metrics={"train_loss": 1.0, "steps": 1})
    assert check_update(update, spec, w, Expectation(1, max_update_ratio=0.21)).rejection is None
    rejection = check_update(update, spec, w, Expectation(1, max_update_ratio=0.19)).rejection
    assert rejection.reason == "norm" and "0.2 x their norm" in rejection.detail


def test_the_distance_is_taken_a_slice_at_a_time(monkeypatch):
    """Slices of 3 elements: the same distance as the whole difference's norm (and the same
    inner product with a gradient), and a NaN or an infinity in any slice, even the last and
    shortest, makes it non-finite."""
    monkeypatch.setattr(validation, "DISTANCE_CHUNK", 3)
    torch.manual_seed(0)
    ref = torch.randn(4, 2)  # 8 elements: slices of 3, 3 and 2
    t, g = ref + torch.randn(4, 2), torch.randn(4, 2)
    distance, dot = validation._distance(t, ref, g)
    assert distance == pytest.approx(float((t - ref).norm()), rel=1e-6)
    assert dot == pytest.approx(float(((t - ref) * g).sum()), rel=1e-5)
    assert validation._distance(t, ref)[1] == 0.0  # no gradient, no inner product
    for bad in (math.nan, math.inf, -math.inf):
        t[3, 1] = bad
        assert not math.isfinite(validation._distance(t, ref)[0])


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        ([1.0, -2.0, 3.0], True),
        ([1.0, math.nan], False),
        ([math.inf, 1.0], False),
        ([-math.inf, 1.0], False),
        ([math.inf, -math.inf], False),  # their sum is NaN
        ([3e38, 3e38, -1e38], True),  # finite values whose float32 sum overflows
    ],
)
def test_all_finite_answers_as_the_elementwise_check(values, finite):
    t = torch.tensor(values, dtype=torch.float32)
    assert validation.all_finite(t) is finite is bool(torch.isfinite(t).all())


def test_the_statistics_aggregation_reads_are_checked():
    """A partial upload: expert (0, 1) is tensor "b"; the reply must carry (1, 2) statistics."""
    spec = UploadSpec(frozenset({"a"}), {"b": ("b", None)}, {(0, 1): ["b"]}, _counts((1, 2)))
    sound = {"a": GLOBAL["a"], "b": GLOBAL["b"]}
    counts = torch.tensor([[0, 1]])
    assert _check(sound, spec=spec, stats={"expert_updates": counts}) is None
    cases = [
        ({}, 1.0, "stats", "'expert_updates' is missing"),
        ({"expert_updates": torch.zeros(2)}, 1.0, "stats", "is (2,), expected (1, 2)"),
        ({"expert_updates": torch.tensor([[0.0, math.nan]])}, 1.0, "stats", "NaN or Inf"),
        ({"expert_updates": counts}, math.inf, "metrics", "train_loss is inf"),
    ]
    for stats, loss, reason, detail in cases:
        rejection = _check(sound, spec=spec, stats=stats, loss=loss)
        assert (rejection.reason, detail in rejection.detail) == (reason, True), rejection
    # it says it updated expert (0, 1) but did not upload it
    rejection = _check({"a": GLOBAL["a"]}, spec=spec, stats={"expert_updates": counts})
    assert rejection.reason == "missing-keys" and "(0, 1) was updated" in rejection.detail


def test_an_expert_comes_whole_or_not_at_all():
    """Expert (0, 0) is two tensors, "b" and "step"; sending one of them is a broken reply,
    even for an expert the client did not update (HFedMoE's usage mode sends those too)."""
    spec = UploadSpec(
        frozenset({"a"}),
        {"b": ("b", None), "step": ("step", None)},
        {(0, 0): ["b", "step"]},
        _counts((1, 1)),
    )
    stats = {"expert_updates": torch.zeros(1, 1)}
    whole = {"a": GLOBAL["a"], "b": GLOBAL["b"], "step": GLOBAL["step"]}
    assert _check(whole, spec=spec, stats=stats) is None
    assert _check({"a": GLOBAL["a"]}, spec=spec, stats=stats) is None  # not sent: fine
    rejection = _check({"a": GLOBAL["a"], "b": GLOBAL["b"]}, spec=spec, stats=stats)
    assert rejection.reason == "missing-keys" and "(0, 0) was uploaded in part" in rejection.detail


def test_an_update_from_no_examples_is_rejected():
    assert _check({"a": GLOBAL["a"], "b": GLOBAL["b"]}, num_examples=0).reason == "examples"


@pytest.mark.parametrize("kind", UPDATE_FAULTS)
def test_every_injected_corruption_is_caught(kind):
    sound = ClientUpdate({"a": torch.tensor([3.1, 4.0]), "b": torch.tensor([[0.1]])}, 10)
    assert _check(sound.weights) is None
    bad = corrupt(sound, kind, GLOBAL)
    expected = {"nan": "non-finite", "inf": "non-finite", "unknown-key": "unknown-keys"}
    expected |= {"missing-key": "missing-keys"}
    assert _check(bad.weights).reason == expected.get(kind, kind)


# --- which client misbehaves when --------------------------------------------------------------


def test_faults_come_from_events_then_from_the_seeded_rate(tiny_bert_dir):
    raw = tiny_raw(tiny_bert_dir, federation={"num_clients": 4, "rounds": 50})
    raw["faults"] = {"rate": 0.3, "kinds": ["nan", "dropout"]}
    raw["faults"]["events"] = [{"round": 2, "partition": 1, "kind": "shape"}]
    cfg = validate(raw)
    plan = {(r, p): planned_fault(cfg, r, p) for r in range(1, 51) for p in range(4)}
    assert plan[(2, 1)] == "shape"
    drawn = [k for (r, p), k in plan.items() if (r, p) != (2, 1)]
    assert set(drawn) == {None, "nan", "dropout"}
    assert 0.2 < sum(k is not None for k in drawn) / len(drawn) < 0.4  # about 30% of 199
    assert plan == {(r, p): planned_fault(cfg, r, p) for r in range(1, 51) for p in range(4)}


def test_fault_config_errors_name_the_field(tiny_bert_dir):
    from hfedmoe.foundation.errors import ConfigError

    raw = tiny_raw(tiny_bert_dir)
    raw["faults"] = {"events": [{"round": 1, "partition": 0, "kind": "deadline"}]}
    with pytest.raises(ConfigError, match=r"needs federation\.round_timeout"):
        validate(raw)
    for kind in ("hang", "crash"):  # only a worker process can be stopped, or die alone
        raw["faults"] = {"events": [{"round": 1, "partition": 0, "kind": kind}]}
        with pytest.raises(ConfigError, match=r"'crash' fault needs federation\.round_timeout"):
            validate(raw)
    assert not {"deadline", "hang", "crash"} & set(validate(tiny_raw(tiny_bert_dir)).faults.kinds)
    raw["faults"] = {"events": [{"round": 1, "partition": 9, "kind": "nan"}]}
    with pytest.raises(ConfigError, match=r"faults.events\[0\].partition: 9 is not a client"):
        validate(raw)
    raw["faults"] = {"kinds": ["meltdown"]}
    with pytest.raises(ConfigError, match=r"faults.kinds.0"):
        validate(raw)
    assert set(FAULT_KINDS) == {
        "dropout",
        "exception",
        "deadline",
        "hang",
        "crash",
        *UPDATE_FAULTS,
        *ATTACK_KINDS,
    }


# --- real runs on the embedded engine ----------------------------------------------------------


def _run(tiny_bert_dir, tmp_path, name: str, algorithm: str, events: list[dict], **federation):
    raw = tiny_raw(tiny_bert_dir, algorithm=algorithm, federation={"rounds": 2, **federation})
    if "num_clients" in federation:  # enough data for every client's partition
        raw["data"]["max_train_examples"] = 30 * federation["num_clients"]
    raw["faults"] = {"events": events}
    run_dir = tmp_path / name
    with time_limit(600):  # a run that hangs fails instead
        run_embedded(validate(raw), str(run_dir), server_app, client_app)
    return read_metrics(run_dir), load_file(run_dir / "model" / "model.safetensors")


def _same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


BAD = [*UPDATE_FAULTS, "exception"]  # what client 1 + i does in round 1


@pytest.mark.parametrize("algorithm", ["fedavg", "hfedmoe"])
def test_a_bad_update_has_no_more_effect_than_a_client_that_never_replied(
    tiny_bert_dir, tmp_path, algorithm
):
    """Clients 1..8 misbehave in round 1, each in another way an update can; the run ends with
    exactly the model of the run in which they simply dropped out, and records why for each.
    (Client 0 is sound: it trains the same in both runs.)"""
    n = 1 + len(BAD)
    federation = {"num_clients": n, "clients_per_round": n}
    gone = [{"round": 1, "partition": 1 + i, "kind": "dropout"} for i in range(len(BAD))]
    dropped, dropped_model = _run(tiny_bert_dir, tmp_path, "dropout", algorithm, gone, **federation)
    assert dropped[1]["failures"] == {"no-reply": len(BAD)} and dropped[1]["clients_ok"] == 1
    bad = [{"round": 1, "partition": 1 + i, "kind": kind} for i, kind in enumerate(BAD)]
    metrics, model = _run(tiny_bert_dir, tmp_path, "bad", algorithm, bad, **federation)
    reasons = {"nan": "non-finite", "inf": "non-finite", "unknown-key": "unknown-keys"}
    reasons |= {"missing-key": "missing-keys", "exception": "error"}
    failed = {c["partition_id"]: c for c in metrics[1]["clients"] if c["status"] == "failed"}
    assert sorted(failed) == list(range(1, n)) and metrics[1]["clients_ok"] == 1
    for i, kind in enumerate(BAD):
        assert failed[1 + i]["failure"] == reasons.get(kind, kind), kind
        assert failed[1 + i]["error"], kind
    assert metrics[1]["failures"] == dict(Counter(reasons.get(k, k) for k in BAD))
    assert all(torch.equal(model[k], dropped_model[k]) for k in model)
    assert [r["test_accuracy"] for r in metrics] == [r["test_accuracy"] for r in dropped]
    assert [r["test_loss"] for r in metrics] == [r["test_loss"] for r in dropped]


def test_a_round_in_which_every_client_fails_leaves_the_model_and_the_run_goes_on(
    tiny_bert_dir, tmp_path
):
    events = [
        {"round": 1, "partition": 0, "kind": "nan"},
        {"round": 1, "partition": 1, "kind": "dropout"},
    ]
    metrics, _ = _run(tiny_bert_dir, tmp_path, "all-fail", "fedavg", events)
    initial, first, second = metrics
    assert first["clients_ok"] == 0 and first["failures"] == {"non-finite": 1, "no-reply": 1}
    assert (first["test_accuracy"], first["test_loss"]) == (
        initial["test_accuracy"],
        initial["test_loss"],
    )
    assert second["clients_ok"] == 2 and second["failures"] == {}


#: federation.round_timeout of the run whose clients hang: about twice what a tiny client takes
#: on a fresh worker here (5 s: its first message builds the cost models, model and data)
TIMEOUT = 10.0


def test_clients_that_hang_or_reply_late_are_stopped_at_the_timeout(tiny_bert_dir, tmp_path):
    """With a round timeout the clients run in a worker process, even with federation.workers
    = 1 (in the server's process a hung client would hang the run). In round 1 client 1
    replies after the timeout and client 2 never returns: each is waited for no longer than
    the timeout, its worker killed and replaced, and counted as no-reply; client 0's round
    goes on, round 2 is normal on a new worker, and the run ends as the run (in the server's
    process) in which both dropped out."""
    late = [
        {"round": 1, "partition": 1, "kind": "deadline"},
        {"round": 1, "partition": 2, "kind": "hang"},
    ]
    federation = {"num_clients": 3, "clients_per_round": 3}
    metrics, model = _run(
        tiny_bert_dir, tmp_path, "late", "fedavg", late, round_timeout=TIMEOUT, **federation
    )
    gone = [{**event, "kind": "dropout"} for event in late]
    dropped, dropped_model = _run(tiny_bert_dir, tmp_path, "gone", "fedavg", gone, **federation)
    assert metrics[1]["failures"] == {"no-reply": 2} and metrics[1]["clients_ok"] == 1
    # two clients stopped one after the other, with the start of a new worker between them
    assert 2 * TIMEOUT <= metrics[1]["round_seconds"] < 2 * TIMEOUT + 60
    assert metrics[2]["failures"] == {} and metrics[2]["clients_ok"] == 3
    assert [r["test_loss"] for r in metrics] == [r["test_loss"] for r in dropped]
    assert _same_model(model, dropped_model)


def test_a_client_whose_worker_dies_fails_alone_and_its_node_keeps_its_state(
    tiny_bert_dir, tmp_path
):
    """Client 1's worker process is SIGKILLed in round 2 (the ``crash`` fault), beside another
    worker: it fails as worker-died, the round goes on with client 0, a new worker serves
    round 3, and the run ends as the one in which it dropped out: FLEX-MoE's personal router,
    which client 1 keeps in its node state from round 1 to round 3, survived the lost message."""
    crash = [{"round": 2, "partition": 1, "kind": "crash"}]
    federation = {"rounds": 3, "workers": 2, "round_timeout": 600.0}
    metrics, model = _run(tiny_bert_dir, tmp_path, "crash", "flexmoe", crash, **federation)
    gone = [{**crash[0], "kind": "dropout"}]
    dropped, dropped_model = _run(tiny_bert_dir, tmp_path, "gone", "flexmoe", gone, rounds=3)
    assert [r["failures"] for r in metrics[1:]] == [{}, {"worker-died": 1}, {}]
    assert [r["clients_ok"] for r in metrics[1:]] == [2, 1, 2]
    failed = next(c for c in metrics[2]["clients"] if c["status"] == "failed")
    assert "SIGKILL" in failed["error"]
    assert [r["test_loss"] for r in metrics] == [r["test_loss"] for r in dropped]
    assert _same_model(model, dropped_model)
