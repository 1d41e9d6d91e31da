"""The embedded engine: the same ServerApp and ClientApp, in one process, without Ray.

:class:`EmbeddedGrid` implements Flower's ``Grid`` (what a ServerApp talks to) by handing each
message to the ClientApp of its destination node, one client after another. Written here
because Flower's own in-memory paths either need a SuperLink state plus a fleet of Ray actors
(the simulation engine) or gRPC servers (the deployment engine); none runs a ClientApp in the
calling process.

Each node runs when its reply is read (``send_and_receive`` is lazy), so the server folds one
reply before the next client trains, and holds one reply at a time.

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
import uuid
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from hfedmoe.federation import wire
from hfedmoe.federation.faults import Dropout
from hfedmoe.federation.server_app import NodeStates
from hfedmoe.foundation.config import ExperimentConfig

#: Node ids of the embedded engine's clients: FIRST_NODE_ID + partition id (deterministic, so
#: the same seed samples the same clients).
FIRST_NODE_ID = 1001

ReplyCallback = Callable[[Message, Message, float], None]


def _cross_wire(content: RecordDict) -> RecordDict:
    """A deep copy through Flower's wire format: what a remote peer would receive."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    copy = inflate_object_from_contents(content.object_id, contents)
    assert isinstance(copy, RecordDict)
    return copy


class EmbeddedGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict,
        run_id: int = 1,
        on_reply: ReplyCallback | None = None,
        clock: Callable[[], float] = time.perf_counter,
        check_wire: bool = True,
    ):
        """``clock``: seconds, for timing each node's reply against the round's timeout;
        ``check_wire``: every message crosses Flower's wire format (else by reference)."""
        self._client_app = client_app
        self._check_wire = check_wire
        self._run = Run.create_empty(run_id)
        self._run.override_config = dict(run_config)
        self._on_reply = on_reply
        self._clock = clock
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
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            start = self._clock()
            with contextlib.suppress(Dropout):  # the node vanished: no reply will ever come
                self._replies[msg.metadata.message_id] = self._deliver(msg)
            self._seconds[msg.metadata.message_id] = self._clock() - start
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        """Every node's reply, except from nodes that took longer than ``timeout`` seconds
        (clients run one after another here; each is timed as if they ran in parallel).

        Lazy: a node runs when the caller reads its reply, so a caller that consumes each reply
        before reading the next (the strategy's running aggregation) holds one at a time."""
        for msg in list(messages):
            [i] = self.push_messages([msg])
            seconds = self._seconds.pop(i, 0.0)
            if timeout is not None and seconds > timeout:
                self._replies.pop(i, None)
                continue
            yield from self.pull_messages([i])

    def _deliver(self, msg: Message) -> Message:
        start = time.perf_counter()
        node = msg.metadata.dst_node_id
        if node not in self._contexts:
            reply = Message(Error(code=404, reason=f"unknown node {node}"), reply_to=msg)
        else:
            received = msg
            if self._check_wire:
                received = Message(_cross_wire(msg.content), metadata=msg.metadata)
            try:
                reply = self._client_app(received, self._contexts[node])
                if reply.has_content() and self._check_wire:
                    reply = Message(_cross_wire(reply.content), metadata=reply.metadata)
            except Exception as exc:  # a failing client must not take the server down
                reply = Message(
                    Error(code=500, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg
                )
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
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
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Run ``server_app`` against ``cfg.federation.num_clients`` in-process ``client_app`` nodes
    (``resume``: continue the run in ``run_dir`` from its checkpoint; ``clock``: what times the
    nodes' replies against the round's timeout)."""
    check_wire = cfg.federation.check_wire
    run_config = {
        wire.RUN_CONFIG: cfg.to_json(),
        wire.RUN_DIR: str(run_dir),
        wire.RESUME: resume,
        wire.BY_REFERENCE: not check_wire,
    }
    run_id = 1
    grid = EmbeddedGrid(
        client_app, cfg.federation.num_clients, run_config, run_id, on_reply, clock, check_wire
    )
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(
        run_id=run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=run_config,
    )
    server_app(grid, context)
