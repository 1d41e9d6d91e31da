"""The embedded engine: the same ServerApp and ClientApp, in one process, without Ray.

:class:`EmbeddedGrid` implements Flower's ``Grid`` (what a ServerApp talks to) by handing each
message to the ClientApp of its destination node, one client after another. Written here
because Flower's own in-memory paths either need a SuperLink state plus a fleet of Ray actors
(the simulation engine) or gRPC servers (the deployment engine); none runs a ClientApp in the
calling process.

Each node runs when its reply is read (``send_and_receive`` is lazy), so the server folds one
reply before the next client trains, and holds one reply at a time.

A client in this process cannot be pre-empted: one that hangs hangs the run, and a late reply
is dropped only once it arrives. ``federation.round_timeout`` is therefore enforced in worker
processes (``hfedmoe.engines.workers``): a set timeout runs the clients there, one worker or
``federation.workers`` of them, and a client still running at its deadline is stopped.

Messages carry their tensors by reference (``wire.TensorRecord``): server and clients share the
process, so nothing is serialised or copied on the way (the clients copy what they receive into
their own resident model). With ``federation.check_wire`` (the tests turn it on) every
message's content instead crosses a real serialisation boundary in both directions: it is
deflated into Flower's content-addressed object tree (the objects the SuperLink stores and
streams) and inflated back, so server and clients never share a Python object, as on the other
engines; the contract that every message survives the wire stays proven.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from hfedmoe.engines.nodes import call_client
from hfedmoe.engines.superlink_role import act_as_superlink, assign_message_id
from hfedmoe.engines.workers import Job, WorkerPool, from_plain
from hfedmoe.federation import wire
from hfedmoe.federation.faults import Dropout
from hfedmoe.federation.server_app import NodeStates
from hfedmoe.foundation.config import ExperimentConfig

#: Node ids of the embedded engine's clients: FIRST_NODE_ID + partition id (deterministic, so
#: the same seed samples the same clients).
FIRST_NODE_ID = 1001

ReplyCallback = Callable[[Message, Message, float], None]


class EmbeddedGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (or its worker processes)."""

    streams_replies = True  # send_and_receive runs each node as its reply is read

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict,
        run_id: int = 1,
        on_reply: ReplyCallback | None = None,
        check_wire: bool = True,
        pool: WorkerPool | None = None,
    ):
        """``check_wire``: every message crosses Flower's wire format (else by reference);
        ``pool``: worker processes that run the clients, several at once, each stopped at its
        timeout (else one after another in this process, where none can be stopped)."""
        self._client_app = client_app
        self._pool = pool
        self._check_wire = check_wire
        self._run = Run.create_empty(run_id)
        self._run.override_config = dict(run_config)
        self._on_reply = on_reply
        self._contexts = {
            FIRST_NODE_ID + pid: Context(
                run_id=run_id,
                node_id=FIRST_NODE_ID + pid,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for pid in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self._seconds: dict[str, float] = {}  # message id -> how long its node took to reply

    def node_states(self) -> NodeStates:
        """The tensors every node keeps in its Context between rounds (for a checkpoint):
        node id -> record name -> tensors."""
        return {
            node: {key: rec.to_torch_state_dict() for key, rec in ctx.state.array_records.items()}
            for node, ctx in self._contexts.items()
            if ctx.state.array_records
        }

    def restore_node_states(self, states: NodeStates) -> None:
        """Put back what :meth:`node_states` returned (resuming a run)."""
        for node, records in states.items():
            for key, tensors in records.items():
                self._contexts[int(node)].state[key] = ArrayRecord(tensors)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            ids.append(assign_message_id(msg))
            start = time.perf_counter()
            with contextlib.suppress(Dropout):  # the node vanished: no reply will ever come
                self._replies[msg.metadata.message_id] = self._deliver(msg)
            self._seconds[msg.metadata.message_id] = time.perf_counter() - start
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        """Every node's reply, except from nodes that took longer than ``timeout`` seconds
        (each node is timed on its own, as if they all ran in parallel). In worker processes a
        node still running at its timeout is stopped; in this process it cannot be, and its
        late reply is dropped when it comes.

        Lazy: a node runs when the caller reads its reply, so a caller that consumes each reply
        before reading the next (the strategy's running aggregation) holds one at a time."""
        if self._pool is not None:
            yield from self._in_workers(list(messages), timeout)
            return
        for msg in list(messages):
            [i] = self.push_messages([msg])
            seconds = self._seconds.pop(i, 0.0)
            if timeout is not None and seconds > timeout:
                self._replies.pop(i, None)
                continue
            yield from self.pull_messages([i])

    def _in_workers(self, messages: list[Message], timeout: float | None):
        """The replies in message order, with up to one message per worker in flight: a worker
        gets the next message before the caller reads the finished reply, so it trains while
        the server folds; replies that finish early wait (at most workers - 1 of them). Each
        client is stopped ``timeout`` seconds after its worker starts it."""
        assert self._pool is not None
        pending: deque[tuple[Message, Job | Message]] = deque()
        queue = iter(messages)

        def submit() -> None:
            if (msg := next(queue, None)) is None:
                return
            assign_message_id(msg)
            node = msg.metadata.dst_node_id
            if node not in self._contexts:
                error = Message(Error(code=404, reason=f"unknown node {node}"), reply_to=msg)
                pending.append((msg, error))
            else:
                context = self._contexts[node]
                pending.append((msg, self._pool.submit(msg, context, self._check_wire, timeout)))

        for _ in range(self._pool.workers):
            submit()
        while pending:
            msg, job = pending.popleft()
            reply, seconds = (job, 0.0) if isinstance(job, Message) else self._answer(msg, job)
            submit()  # the worker that answered is free
            if reply is None:  # the node vanished or was stopped: no reply will ever come
                continue
            assign_message_id(reply)
            if self._on_reply:
                self._on_reply(msg, reply, seconds)
            if timeout is None or seconds <= timeout:
                yield reply

    def _answer(self, msg: Message, job: Job) -> tuple[Message | None, float]:
        """The reply a worker's outcome makes (None: none), and how long the client took. A
        worker that died answers a Flower error reply (``wire.WORKER_DIED``); the node keeps
        its state unless the worker finished the message."""
        assert self._pool is not None
        what, payload, state, seconds = self._pool.result(job)
        if state is not None:
            self._pool.restore_state(self._contexts[msg.metadata.dst_node_id], state)
        if what in ("dropout", "timeout"):
            return None, seconds
        if what == "reply":
            content = from_plain(payload)
        elif what == "died":
            content = Error(code=wire.WORKER_DIED, reason=str(payload))
        else:
            content = Error(*payload)
        return Message(content, reply_to=msg), seconds

    def _deliver(self, msg: Message) -> Message:
        start = time.perf_counter()
        node = msg.metadata.dst_node_id
        if node not in self._contexts:
            reply = Message(Error(code=404, reason=f"unknown node {node}"), reply_to=msg)
        else:
            reply = call_client(self._client_app, msg, self._contexts[node], self._check_wire)
        assign_message_id(reply)
        if self._on_reply:
            self._on_reply(msg, reply, time.perf_counter() - start)
        return reply


def run_embedded(
    cfg: ExperimentConfig,
    run_dir: str,
    server_app: ServerApp,
    client_app: ClientApp,
    on_reply: ReplyCallback | None = None,
    resume: bool = False,
    client_app_ref: str = "hfedmoe.federation.client_app:app",
) -> None:
    """Run ``server_app`` against ``cfg.federation.num_clients`` in-process ``client_app`` nodes
    (``resume``: continue the run in ``run_dir`` from its checkpoint). With
    ``federation.workers`` > 1, or a ``federation.round_timeout`` (only a worker process can be
    stopped at its timeout), the clients run in ``federation.workers`` worker processes, each
    importing the ClientApp ``client_app_ref`` (``module:attribute``; ``client_app`` is then
    not called)."""
    check_wire = cfg.federation.check_wire
    run_config = {
        wire.RUN_CONFIG: cfg.to_json(),
        wire.RUN_DIR: str(run_dir),
        wire.RESUME: resume,
        wire.BY_REFERENCE: not check_wire,
    }
    run_id = 1
    fed = cfg.federation
    in_workers = fed.workers > 1 or fed.round_timeout is not None
    pool = WorkerPool(fed.workers, client_app_ref) if in_workers else None
    grid = EmbeddedGrid(client_app, fed.num_clients, run_config, run_id, on_reply, check_wire, pool)
    act_as_superlink(run_id)
    context = Context(
        run_id=run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=run_config,
    )
    try:
        server_app(grid, context)
    finally:
        if pool is not None:
            pool.close()
