"""The Flower engine pieces: the in-process Grid, the wire format, client sampling."""

from __future__ import annotations

import weakref

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from hfedmoe.algorithms import ClientUpdate, TrainRequest
from hfedmoe.engines.embedded import FIRST_NODE_ID, EmbeddedGrid
from hfedmoe.engines.superlink_role import act_as_superlink, assign_message_id
from hfedmoe.federation import wire
from hfedmoe.federation.strategy import sample_clients
from hfedmoe.foundation.seeding import SAMPLING, rng_for

echo_app = ClientApp()
seen: list[tuple[int, dict]] = []


@echo_app.train()
def _echo(msg: Message, context: Context) -> Message:
    arrays = msg.content.array_records["arrays"]
    seen.append((int(context.node_config["partition-id"]), arrays.to_torch_state_dict()))
    if context.node_config["partition-id"] == 1:
        raise RuntimeError("battery died")
    doubled = {k: v * 2 for k, v in arrays.to_torch_state_dict().items()}
    return Message(RecordDict({"arrays": ArrayRecord(doubled)}), reply_to=msg)


def _send(grid: EmbeddedGrid, node: int, tensor: torch.Tensor) -> Message:
    act_as_superlink(1)
    content = RecordDict({"arrays": ArrayRecord({"w": tensor}), "config": ConfigRecord({"r": 1})})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id="1")


def test_in_process_grid_delivers_copies_and_reports_client_errors():
    seen.clear()
    calls = []
    grid = EmbeddedGrid(
        echo_app,
        num_nodes=3,
        run_config={},
        on_reply=lambda m, r, s: calls.append(r.metadata.src_node_id),
    )
    assert sorted(grid.get_node_ids()) == [FIRST_NODE_ID, FIRST_NODE_ID + 1, FIRST_NODE_ID + 2]
    sent = torch.tensor([1.0, 2.0])
    replies = {
        r.metadata.src_node_id: r
        for r in grid.send_and_receive(
            [_send(grid, FIRST_NODE_ID, sent), _send(grid, FIRST_NODE_ID + 1, sent)]
        )
    }
    ok, failed = replies[FIRST_NODE_ID], replies[FIRST_NODE_ID + 1]
    assert torch.equal(ok.content.array_records["arrays"].to_torch_state_dict()["w"], sent * 2)
    assert failed.has_error() and "battery died" in failed.error.reason
    assert [pid for pid, _ in seen] == [0, 1]
    seen[0][1]["w"].add_(100)  # what a client holds is its own copy
    assert torch.equal(sent, torch.tensor([1.0, 2.0]))
    assert calls == [FIRST_NODE_ID, FIRST_NODE_ID + 1]


def test_task_and_update_survive_the_wire():
    task = TrainRequest({"a": torch.arange(3.0)}, {"budget": 2})
    back, server_round = wire.unpack_request(wire.pack_request(task, 4))
    assert server_round == 4 and back.config == {"budget": 2}
    assert torch.equal(back.weights["a"], task.weights["a"])

    update = ClientUpdate({"a": torch.ones(2)}, 17, {"train_loss": 0.5}, {"usage": torch.zeros(4)})
    content = wire.pack_update(update, partition_id=3)
    npy_header = 128  # each array travels as a .npy file: a 128-byte header, then the data
    assert wire.payload_bytes(content) == (npy_header + 2 * 4) + (npy_header + 4 * 4)
    got, pid = wire.unpack_update(content)
    assert (pid, got.num_examples, got.metrics) == (3, 17, {"train_loss": 0.5})
    assert torch.equal(got.stats["usage"], torch.zeros(4))
    assert wire.payload_bytes(content) == 0  # unpacking consumed the reply: no second copy


def test_by_reference_the_grid_hands_over_the_same_tensors():
    """Without check_wire the embedded engine serialises nothing: the client receives the very
    tensors the server sent (it copies them into its own model), and a by-reference record
    refuses to cross a wire rather than arrive empty."""
    seen.clear()
    grid = EmbeddedGrid(echo_app, num_nodes=1, run_config={}, check_wire=False)
    act_as_superlink(1)
    sent = torch.tensor([1.0, 2.0])
    task = TrainRequest({"w": sent})
    content = wire.pack_request(task, 1, arrays=wire.TensorRecord(task.weights))
    msg = Message(content, dst_node_id=FIRST_NODE_ID, message_type=MessageType.TRAIN, group_id="1")
    (reply,) = grid.send_and_receive([msg])
    assert seen[0][1]["w"] is sent
    assert torch.equal(reply.content.array_records["arrays"].to_torch_state_dict()["w"], sent * 2)
    with pytest.raises(RuntimeError, match="cannot cross the wire"):
        content.array_records["arrays"].deflate()


def test_by_reference_counts_the_bytes_the_wire_would_carry():
    update = ClientUpdate(
        {"a": torch.ones(2, 3), "n": torch.zeros((), dtype=torch.int64), "m": torch.ones(4) > 0},
        17,
        {"train_loss": 0.5},
        {"usage": torch.zeros(2, 4, dtype=torch.float64)},
    )
    serialised = wire.pack_update(update, 3)
    by_reference = wire.pack_update(update, 3, by_reference=True)
    assert wire.payload_bytes(by_reference) == wire.payload_bytes(serialised)
    got, _ = wire.unpack_update(by_reference)
    assert got.weights["a"] is update.weights["a"] and got.stats["usage"] is update.stats["usage"]


def test_client_sampling_is_reproducible_and_varies_by_round():
    nodes = list(range(100, 120))
    first = sample_clients(nodes, 5, rng_for(0, SAMPLING, 1))
    assert first == sample_clients(reversed(nodes), 5, rng_for(0, SAMPLING, 1))
    assert len(set(first)) == 5 and set(first) <= set(nodes)
    assert first != sample_clients(nodes, 5, rng_for(0, SAMPLING, 2))


def test_the_server_folds_each_reply_before_the_next_client_trains(tiny_bert_dir, tmp_path):
    """Running aggregation: the embedded engine runs a client when its reply is read, and the
    strategy folds the reply and lets it go, so when a client trains, no earlier reply of the
    round is alive: the server holds one reply, not K."""
    from hfedmoe.engines.embedded import run_embedded
    from hfedmoe.federation.client_app import app as client_app
    from hfedmoe.federation.server_app import app as server_app
    from hfedmoe.foundation.config import validate
    from hfedmoe.results import read_metrics

    from .support.configs import tiny_raw

    sent: list[weakref.ref] = []  # every tensor a client has replied with
    alive_when_training: list[int] = []

    def watched(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:
            alive_when_training.append(sum(ref() is not None for ref in sent))
        reply = client_app(msg, context)
        if reply.has_content() and "arrays" in reply.content.array_records:
            tensors = reply.content.array_records["arrays"].to_torch_state_dict().values()
            sent.extend(weakref.ref(t) for t in tensors)
        return reply

    federation = {"num_clients": 3, "clients_per_round": 3, "rounds": 2, "check_wire": False}
    cfg = validate(tiny_raw(tiny_bert_dir, algorithm="hfedmoe", federation=federation))
    run_embedded(cfg, str(tmp_path / "run"), server_app, watched)
    assert len(alive_when_training) == 6 and sent
    assert alive_when_training == [0] * 6
    assert all(r["clients_ok"] == 3 for r in read_metrics(tmp_path / "run")[1:])


# HFedMoE in the default selection; FLEX-MoE's node state is also resumed by test_resume.py
@pytest.mark.parametrize("algorithm", [pytest.param("flexmoe", marks=pytest.mark.slow), "hfedmoe"])
def test_worker_processes_give_the_same_run(tiny_bert_dir, tmp_path, algorithm):
    """federation.workers = 2 trains two clients at once in spawned worker processes: the same
    metrics as one process, bit for bit (threads = 1), with node memory (FLEX-MoE's personal
    routers), a client that raises and one that vanishes."""
    from hfedmoe.engines.embedded import run_embedded
    from hfedmoe.federation.client_app import app as client_app
    from hfedmoe.federation.server_app import app as server_app
    from hfedmoe.foundation.config import validate
    from hfedmoe.results import engine_independent, read_metrics

    from .support.configs import tiny_raw

    runs = {}
    for workers in (1, 2):
        federation = {"num_clients": 4, "clients_per_round": 3, "workers": workers}
        raw = tiny_raw(tiny_bert_dir, algorithm=algorithm, federation=federation)
        raw["faults"] = {
            "events": [
                {"round": 1, "partition": 2, "kind": "exception"},
                {"round": 2, "partition": 1, "kind": "dropout"},
            ]
        }
        runs[workers] = tmp_path / f"workers-{workers}"
        run_embedded(validate(raw), str(runs[workers]), server_app, client_app)
    assert engine_independent(runs[2]) == engine_independent(runs[1])
    rounds = read_metrics(runs[2])[1:]
    failures = [r["failures"] for r in rounds]
    assert sum(r["clients_ok"] for r in rounds) > 0
    assert {"error", "no-reply"} <= {kind for f in failures for kind in f}


class _SlowGrid:
    """A Flower-style grid (push, then pull what has arrived): replies come out of order on
    successive pulls, and node 3 never answers."""

    def __init__(self) -> None:
        self.pulls = 0
        self.sent: list[Message] = []

    def push_messages(self, messages):
        self.sent = list(messages)
        for i, msg in enumerate(self.sent):
            assign_message_id(msg, f"m{i}")
        return [m.metadata.message_id for m in self.sent]

    def pull_messages(self, message_ids):
        self.pulls += 1
        arrives = {1: [2], 2: [0], 3: [1]}.get(self.pulls, [])  # message index per pull
        return [
            Message(RecordDict(), reply_to=self.sent[i])
            for i in arrives
            if self.sent[i].metadata.message_id in message_ids
        ]


def test_replies_are_handed_over_in_message_order_as_they_arrive():
    """Flower's engines: the server polls and yields each reply once it and every reply before
    it have arrived (so it folds in client order, holding back only what came early); at the
    timeout what arrived follows in order, and a node that never answers is left out."""
    from hfedmoe.federation.server_app import receive

    act_as_superlink(1)
    grid = _SlowGrid()
    messages = [
        Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN, group_id="1")
        for n in (10, 11, 12, 13)
    ]
    order = [r.metadata.reply_to_message_id for r in receive(grid, messages, 0.05, 0.01)]
    assert order == ["m0", "m1", "m2"]
    assert grid.pulls >= 4  # it kept polling for m3 until the timeout


def test_a_client_process_reads_and_partitions_the_split_once(tiny_bert_dir, monkeypatch):
    """Every partition a client process trains is cut from one read of the split (it re-read
    and repartitioned it for each), and is the partition a fresh process would build."""
    import numpy as np

    from hfedmoe.federation import client_app, workload
    from hfedmoe.foundation.config import validate

    from .support.configs import tiny_raw

    cfg = validate(tiny_raw(tiny_bert_dir, federation={"num_clients": 3}))
    reads = []
    read = workload.load_dataset
    monkeypatch.setattr(workload, "load_dataset", lambda *a: reads.append(a) or read(*a))
    client_app._source.cache_clear()
    client_app._data.cache_clear()
    cached = [client_app._data(cfg.to_json(), pid, 3) for pid in range(3)]
    assert len(reads) == 1
    for pid, data in enumerate(cached):
        fresh = workload.client_data(cfg, pid, 3)
        assert len(data) == len(fresh) > 0
        pairs = zip(data.input_ids, fresh.input_ids, strict=True)
        assert all(np.array_equal(a, b) for a, b in pairs)


def _probe(**config) -> Message:
    act_as_superlink(1)
    content = RecordDict({"config": ConfigRecord(config)})
    msg = Message(content, dst_node_id=FIRST_NODE_ID, message_type=MessageType.TRAIN, group_id="1")
    assign_message_id(msg, f"probe-{sorted(config.items())}")
    return msg


def test_a_worker_that_hangs_or_dies_is_replaced_by_a_fresh_process():
    """The worker pool: a message still running at its deadline is stopped ("timeout", after
    the timeout and not later), one whose worker process exits is "died"; either way the node
    state does not come back, and the next message on that slot runs in a new process."""
    import time

    from hfedmoe.engines.workers import WorkerPool

    from .support.guards import time_limit

    context = Context(
        run_id=1, node_id=FIRST_NODE_ID, node_config={}, state=RecordDict(), run_config={}
    )
    pool = WorkerPool(1, "tests.support.probe_app:app")

    def run(timeout: float = 2.0, **config):
        started = time.monotonic()
        outcome = pool.result(pool.submit(_probe(**config), context, False, timeout))
        return outcome, time.monotonic() - started

    def pid_after(outcome) -> int:
        what, payload, state, _ = outcome
        assert what == "reply" and state is not None, outcome
        return payload["metrics"][1]["pid"]

    try:
        with time_limit(300):
            first, _ = run()
            (what, _, state, _), waited = run(sleep=3600)
            assert what == "timeout" and state is None and 2.0 <= waited < 3.5
            second, _ = run()
            (what, reason, state, _), _ = run(exit=3)
            assert what == "died" and state is None and "exit code 3" in reason
            third, _ = run()
    finally:
        pool.close()
    assert len({pid_after(first), pid_after(second), pid_after(third)}) == 3
