"""Every reply is untrusted: whatever a client sends, the strategy never raises, and the global
model is exactly what the valid replies alone give (a property over hypothesis-generated
replies through the real strategy, serialised into Flower's wire format)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfedmoe.algorithms import build_algorithm
from hfedmoe.algorithms.mechanics.assignment import ASSIGNED
from hfedmoe.engines.superlink_role import act_as_superlink, assign_message_id
from hfedmoe.federation import wire
from hfedmoe.federation.strategy import AlgorithmStrategy
from hfedmoe.federation.workload import server_workload
from hfedmoe.foundation.config import validate
from hfedmoe.model.state import shared_state

from .support.configs import tiny_raw

CLIENTS = 4
SIZES = (12, 30, 7, 21)  # |D_c| the server knows for clients 0..3

#: what one client's reply can be: sound, or broken in one way
CORRUPTIONS = [
    "metric-inf",
    "metric-nan",
    "metric-huge",
    "metric-negative",
    "metric-list",
    "metric-undeclared",
    "metric-missing",
    "metric-loss-huge",
    "examples-other",
    "examples-float",
    "partition-other",
    "tensor-missing",
    "tensor-extra",
    "tensor-shape",
    "tensor-nan",
    "tensor-scaled",
    "stat-missing",
    "stat-extra",
    "stat-shape",
    "stat-range",
    "stat-nan",
    "stat-dtype",
    "record-extra",
    "record-missing",
    "error-reply",
]


class _Setup:
    """A tiny model's server side, built once per algorithm."""

    def __init__(self, tiny_bert_dir, algorithm: str):
        raw = tiny_raw(
            tiny_bert_dir,
            algorithm=algorithm,
            federation={"num_clients": CLIENTS, "clients_per_round": CLIENTS},
        )
        self.cfg = validate(raw)
        self.model = server_workload(self.cfg).model
        self.glob = {k: v.clone() for k, v in shared_state(self.model).items()}

    def strategy(self) -> AlgorithmStrategy:
        algorithm = build_algorithm(self.cfg)
        algorithm.bind(self.model)
        strategy = AlgorithmStrategy(algorithm, self.cfg)
        strategy.spec = algorithm.upload_spec(self.model)
        devices = {
            100 + c: wire.DeviceReport(c, "", 0, 24, 24, CLIENTS, SIZES[c]) for c in range(CLIENTS)
        }
        strategy.set_devices(devices, SIZES)
        return strategy


@pytest.fixture(scope="module", params=["fedavg", "hfedmoe"])
def setup(request, tiny_bert_dir):
    # Flower stamps every Message with its task: the run's, as the embedded engine sets it
    act_as_superlink(1)
    return _Setup(tiny_bert_dir, request.param)


def _messages(strategy: AlgorithmStrategy, setup: _Setup) -> list[Message]:
    """Round 1's train messages, with the ids a grid gives them (replies refer to them)."""
    messages = list(
        strategy.configure_train(1, wire.TensorRecord(setup.glob), ConfigRecord(), None)
    )
    for i, message in enumerate(messages):
        assign_message_id(message, f"m{i}")
    return messages


def _sound(strategy: AlgorithmStrategy, message: Message, client: int) -> dict:
    """A valid reply's parts for ``client``: every required tensor moved a little, the experts
    it says it updated, statistics and metrics in range."""
    spec = strategy.spec
    g = torch.Generator().manual_seed(client)
    refs = spec.references(strategy._global)
    L_E = spec.stats["expert_updates"].shape
    counts = torch.randint(0, 3, L_E, generator=g)
    weights = {k: refs[k] + 1e-6 * torch.randn(refs[k].shape, generator=g) for k in spec.required}
    for (layer, e), keys in spec.expert_keys.items():
        if counts[layer, e] > 0:
            weights.update(
                {k: refs[k] + 1e-6 * torch.randn(refs[k].shape, generator=g) for k in keys}
            )
    stats = {"expert_updates": counts}
    if "usage" in spec.stats:
        stats["usage"] = torch.softmax(torch.randn(L_E, generator=g), -1)
        stats["importance"] = torch.rand(L_E, generator=g)
    steps = strategy.cfg.train.local_steps
    metrics = {"train_loss": 1.0 + client, "steps": float(steps)}
    return {
        "weights": weights,
        "stats": stats,
        "metrics": metrics,
        "n": SIZES[client],
        "partition": client,
        "request": message,
    }


#: values steps (at most local_steps = 2) and expert counts (at most L x E) may not take, and no
#: undeclared metric may take at all: drawn at random by hypothesis
INVALID_VALUES = st.one_of(
    st.floats(max_value=-1e-6),
    st.floats(min_value=1e9),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.lists(st.floats(allow_nan=True), max_size=3),
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=3),
)

#: a corruption: one of CORRUPTIONS, or (metric name, a value it may not take), or a factor a
#: whole upload is scaled by (beyond what local training can move it)
CORRUPTION = st.one_of(
    st.none(),
    st.sampled_from(CORRUPTIONS),
    st.tuples(st.sampled_from(["steps", "experts_updated", "secret"]), INVALID_VALUES),
    st.floats(min_value=1.5, max_value=1e6),
)


def _reply(parts: dict, corruption) -> Message:
    """The reply a client sends: ``parts`` as the wire carries them, broken by ``corruption``."""
    w, s, m = dict(parts["weights"]), dict(parts["stats"]), dict(parts["metrics"])
    n, partition = parts["n"], parts["partition"]
    records: dict = {}
    first = min(w)
    if isinstance(corruption, tuple):  # a metric's random invalid value
        name, value = corruption
        m[name] = value
        corruption = None
    elif isinstance(corruption, float):  # the whole upload scaled
        w = {k: t * corruption for k, t in w.items()}
        corruption = None
    match corruption:
        case "error-reply":
            return Message(Error(code=1, reason="boom"), reply_to=parts["request"])
        case "metric-inf":
            m["steps"] = math.inf
        case "metric-nan":
            m["train_loss"] = math.nan
        case "metric-huge":
            m["steps"] = 1e300
        case "metric-negative":
            m["train_loss"] = -1.0
        case "metric-list":
            m["steps"] = [1, 2]
        case "metric-undeclared":
            m["secret"] = 1.0
        case "metric-missing":
            del m["train_loss"]
        case "metric-loss-huge":  # finite, yet the round's mean loss would overflow
            m["train_loss"] = 1e308
        case "examples-other":
            n = 10**12
        case "examples-float":
            n = float(n)
        case "partition-other":
            partition = (partition + 1) % CLIENTS
        case "tensor-missing":
            del w[first]
        case "tensor-extra":
            w["injected.weight"] = torch.zeros(3)
        case "tensor-shape":
            w[first] = w[first].flatten()[:-1]
        case "tensor-nan":
            w[first] = w[first].clone()
            w[first].view(-1)[0] = math.nan
        case "tensor-scaled":  # far beyond what local training can move the weights
            w = {k: t * 3 for k, t in w.items()}
        case "stat-missing":
            del s["expert_updates"]
        case "stat-extra":
            s["injected"] = torch.zeros(2)
        case "stat-shape":
            s["expert_updates"] = s["expert_updates"].flatten()
        case "stat-range":
            s["expert_updates"] = s["expert_updates"] - 5
        case "stat-nan":
            s["expert_updates"] = torch.full(s["expert_updates"].shape, math.nan)
        case "stat-dtype":  # in range, of a dtype the server cannot compute with
            if "importance" in s:
                s["importance"] = (s["importance"] > 0.5).long()
            else:
                s["expert_updates"] = s["expert_updates"] > 0
        case "record-extra":
            records["extra"] = ConfigRecord({"x": 1})
        case "record-missing":
            return Message(RecordDict({wire.ARRAYS: ArrayRecord(w)}), reply_to=parts["request"])
    metrics = {wire.NUM_EXAMPLES: n, wire.PARTITION_ID: partition, **m}
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(w),
            wire.METRICS: MetricRecord(metrics),
            wire.STATS: ArrayRecord(s),
            **records,
        }
    )
    return Message(content, reply_to=parts["request"])


def _aggregate(setup: _Setup, corruptions: list[str | None]):
    """The strategy's round-1 aggregate of the clients' replies (None: sound), with every
    client's reports."""
    strategy = setup.strategy()
    messages = list(
        strategy.configure_train(1, wire.TensorRecord(setup.glob), ConfigRecord(), None)
    )
    replies = []
    for message, corruption in zip(messages, corruptions, strict=True):
        client = strategy._client(message.metadata.dst_node_id)
        replies.append(_reply(_sound(strategy, message, client), corruption))
    folded = strategy.fold(1, replies)
    return folded.arrays, folded.reports


@given(st.lists(CORRUPTION, min_size=4, max_size=4))
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_no_reply_stops_the_round_and_only_valid_replies_reach_the_model(setup, corruptions):
    arrays, reports = _aggregate(setup, corruptions)
    assert [r.status for r in reports] == ["ok" if c is None else "failed" for c in corruptions]
    for report, corruption in zip(reports, corruptions, strict=True):
        if corruption is not None:
            assert report.failure and report.error, corruption
    if all(c is not None for c in corruptions):
        assert arrays is None  # nobody valid: the model stays
        return
    # the same round with the broken clients silent
    valid_only = _aggregate_silent(setup, [c is None for c in corruptions])
    mine = arrays.to_torch_state_dict()
    assert mine.keys() == valid_only.keys()
    assert all(torch.equal(mine[k], valid_only[k]) for k in mine)


def _aggregate_silent(setup: _Setup, answers: list[bool]):
    strategy = setup.strategy()
    messages = list(
        strategy.configure_train(1, wire.TensorRecord(setup.glob), ConfigRecord(), None)
    )
    replies = []
    for message, answer in zip(messages, answers, strict=True):
        if answer:
            client = strategy._client(message.metadata.dst_node_id)
            replies.append(_reply(_sound(strategy, message, client), None))
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays.to_torch_state_dict()


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_each_broken_reply_is_a_failure_with_its_reason(setup, corruption):
    _, reports = _aggregate(setup, [corruption, None, None, None])
    expected = {
        "error-reply": "error",
        "examples-other": "examples",
        "partition-other": "partition",
        "tensor-missing": "missing-keys",
        "tensor-extra": "unknown-keys",
        "tensor-shape": "shape",
        "tensor-nan": "non-finite",
        "tensor-scaled": "bound",
    }
    prefix = corruption.split("-")[0]
    reason = expected.get(
        corruption, {"metric": "metrics", "stat": "stats"}.get(prefix, "malformed")
    )
    assert (reports[0].status, reports[0].failure) == ("failed", reason), reports[0].error
    assert [r.status for r in reports[1:]] == ["ok"] * 3


def test_a_refused_aggregate_leaves_the_algorithm_as_it_was(setup, monkeypatch):
    # an aggregate that is not finite (defence in depth: validated replies never make one) is
    # refused, and what the round would have taught the algorithm is never committed
    strategy = setup.strategy()
    before = strategy.algorithm.checkpoint_state()
    aggregation = type(strategy.algorithm).aggregation

    def poisoned(self, server_round, global_weights):
        fold = aggregation(self, server_round, global_weights)
        finish = fold.finish
        fold.finish = lambda: {k: torch.full_like(v, math.nan) for k, v in finish().items()}
        return fold

    monkeypatch.setattr(type(strategy.algorithm), "aggregation", poisoned)
    messages = list(
        strategy.configure_train(1, wire.TensorRecord(setup.glob), ConfigRecord(), None)
    )
    replies = [
        _reply(_sound(strategy, m, strategy._client(m.metadata.dst_node_id)), None)
        for m in messages
    ]
    folded = strategy.fold(1, replies)
    assert folded.arrays is None and folded.rejected
    after = strategy.algorithm.checkpoint_state()
    assert after.keys() == before.keys()
    for key in before:  # HFedMoE's s_c per client: still none
        assert str(after[key]) == str(before[key])


def test_an_expert_the_request_did_not_assign_is_refused(tiny_bert_dir):
    # a random-subset client assigned some experts uploads one more, claiming no update of it
    # (a method that reads what was uploaded would count it)
    setup = _Setup(tiny_bert_dir, "random")
    strategy = setup.strategy()
    budget_2 = {100 + c: wire.DeviceReport(c, "", 0, 2, 24, CLIENTS, SIZES[c]) for c in range(4)}
    strategy.set_devices(budget_2, SIZES)  # each client is assigned 2 of the experts
    messages = _messages(strategy, setup)
    node = messages[0].metadata.dst_node_id
    client = strategy._client(node)
    parts = _sound(strategy, messages[0], client)
    spec = strategy.spec
    assigned = set(strategy._configs[node][ASSIGNED])
    L_E = spec.stats["expert_updates"].shape
    counts = torch.zeros(L_E, dtype=torch.long)
    other = next(x for x in spec.expert_keys if x[0] * L_E[1] + x[1] not in assigned)
    refs = spec.references(strategy._global)
    weights = {k: refs[k].clone() for k in spec.required}
    weights.update({k: refs[k] + 1e-6 for k in spec.expert_keys[other]})
    parts.update(weights=weights, stats={"expert_updates": counts})
    folded = strategy.fold(1, [_reply(parts, None)])
    report = folded.reports[0]
    assert (report.status, report.failure) == ("failed", "unknown-keys"), report.error
    assert "was not assigned" in report.error
