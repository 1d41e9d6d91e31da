"""Parallel clients for the embedded engine: ``federation.workers = N`` worker processes.

Each worker is a spawned process that imports the ClientApp once and keeps what its module
caches between the clients it serves (one resident model, tokenised partitions, the cost
model). A message travels to a worker as plain records: tensors are pickled by
``torch.multiprocessing``, which moves a tensor's storage into shared memory once and then
passes a handle, so the server's weights (its model's own tensors, moved there on the first
send) are not copied per client; a reply's tensors come back the same way. The node's Context
state goes with the message and comes back with the reply. Each client is seeded by (seed,
round, partition), so which worker trains it, and when, does not change what it computes.

Written here because Flower's own parallel engine (the simulation engine) needs Ray actors and
a SuperLink; this one is a standard-library process pool.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor

import torch
import torch.multiprocessing as mp
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from hfedmoe.engines.nodes import call_client
from hfedmoe.federation import wire
from hfedmoe.federation.faults import Dropout

#: record name -> (kind, value): "arrays" (name -> tensor), "config" or "metrics" (a dict)
Plain = dict[str, tuple[str, dict]]

_APP = None  # the worker's ClientApp


def to_plain(content: RecordDict) -> Plain:
    """A RecordDict as plain data (a by-reference record's tensors as they are)."""
    out: Plain = {}
    for name, rec in content.array_records.items():
        out[name] = ("arrays", rec.to_torch_state_dict())
    for name, rec in content.config_records.items():
        out[name] = ("config", dict(rec))
    for name, rec in content.metric_records.items():
        out[name] = ("metrics", dict(rec))
    return out


def from_plain(plain: Plain, by_reference: bool = True) -> RecordDict:
    """The RecordDict of :func:`to_plain`; its arrays by reference, or serialised (to cross
    Flower's wire format next)."""
    records = {}
    for name, (kind, value) in plain.items():
        if kind == "arrays":
            records[name] = wire.tensor_record(value, by_reference)
        else:
            records[name] = ConfigRecord(value) if kind == "config" else MetricRecord(value)
    return RecordDict(records)


def _state_plain(state: RecordDict) -> dict[str, dict[str, torch.Tensor]]:
    return {k: rec.to_torch_state_dict() for k, rec in state.array_records.items()}


def _init(app_ref: str) -> None:
    global _APP
    module, attr = app_ref.split(":")
    _APP = getattr(importlib.import_module(module), attr)


def _serve(
    request: dict, content: Plain, state: dict[str, dict[str, torch.Tensor]]
) -> tuple[str, object, dict, float]:
    """In a worker: one message to the ClientApp. Returns (what, payload, node state, seconds):
    ("reply", plain content), ("error", (code, reason)) or ("dropout", None)."""
    # Flower stamps every Message with the task it belongs to: the run's, as in the parent
    TaskIdentity.task_id, TaskIdentity.run_id = 1, request["run_id"]
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    msg = Message(
        from_plain(content, by_reference=not request["check_wire"]),
        dst_node_id=request["node"],
        message_type=request["message_type"],
        group_id=request["group_id"],
    )
    msg.metadata.__dict__["_message_id"] = request["message_id"]
    context = Context(
        run_id=request["run_id"],
        node_id=request["node"],
        node_config=request["node_config"],
        state=RecordDict({k: ArrayRecord(v) for k, v in state.items()}),
        run_config=request["run_config"],
    )
    start = time.perf_counter()
    try:
        reply = call_client(_APP, msg, context, request["check_wire"])
    except Dropout:
        reply = None
    seconds, state = time.perf_counter() - start, _state_plain(context.state)
    if reply is None:
        return "dropout", None, state, seconds
    if reply.has_error():
        return "error", (reply.error.code, reply.error.reason), state, seconds
    return "reply", to_plain(reply.content), state, seconds


class WorkerPool:
    """N spawned worker processes that run a ClientApp (named ``module:attribute``)."""

    def __init__(self, workers: int, app_ref: str):
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            workers, mp_context=mp.get_context("spawn"), initializer=_init, initargs=(app_ref,)
        )

    def submit(
        self, msg: Message, context: Context, check_wire: bool
    ) -> Future[tuple[str, object, dict, float]]:
        request = {
            "node": msg.metadata.dst_node_id,
            "message_type": msg.metadata.message_type,
            "group_id": msg.metadata.group_id,
            "message_id": msg.metadata.message_id,
            "run_id": context.run_id,
            "node_config": dict(context.node_config),
            "run_config": dict(context.run_config),
            "check_wire": check_wire,
        }
        return self._pool.submit(
            _serve, request, to_plain(msg.content), _state_plain(context.state)
        )

    @staticmethod
    def restore_state(context: Context, state: Mapping[str, dict[str, torch.Tensor]]) -> None:
        """Put a worker's node state back into the node's Context."""
        for key in list(context.state.array_records):
            del context.state[key]
        for key, tensors in state.items():
            context.state[key] = ArrayRecord(tensors)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
