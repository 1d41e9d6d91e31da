"""Parallel clients for the embedded engine: worker processes, each of which can be stopped.

``federation.workers = N`` (or a set ``federation.round_timeout``, with N = 1) runs the clients
in N spawned worker processes. Each imports the ClientApp once and keeps what its module caches
between the clients it serves (one resident model, tokenised partitions, the cost model). A
message travels to a worker as plain records over the worker's own pipe: tensors are pickled by
``torch.multiprocessing``'s reductions (it registers them with multiprocessing's
``ForkingPickler``, the pickler of every ``Connection``), which move a tensor's storage into
shared memory once and then pass a handle, so the server's weights (its model's own tensors,
moved there on the first send) are not copied per client; a reply's tensors come back the same
way. The node's Context state goes with the message and comes back with the reply. Each client
is seeded by (seed, round, partition), so which worker trains it, and when, does not change what
it computes.

A fault stays with its own client: a client still running at its deadline has its worker killed,
and a worker that dies (killed by the OS for memory, say) loses only the message it held; either
way a fresh process takes its place, and the node keeps the state it had before that message.
The deadline runs from when the worker starts the message, not from its own start-up.

Written here because Flower's own parallel engine (the simulation engine) needs Ray actors and
a SuperLink, and the standard library's ``ProcessPoolExecutor`` can neither stop a running job
nor survive the death of one worker (the whole pool breaks).
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import torch
import torch.multiprocessing as mp
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from hfedmoe.engines.nodes import call_client
from hfedmoe.engines.superlink_role import act_as_superlink, assign_message_id
from hfedmoe.federation import wire
from hfedmoe.federation.faults import Dropout

#: record name -> (kind, value): "arrays" (name -> tensor), "config" or "metrics" (a dict)
Plain = dict[str, tuple[str, dict]]
#: a node's Context state: record name -> tensors
NodeState = dict[str, dict[str, torch.Tensor]]
#: what became of a message: (what, payload, node state, seconds), what being "reply" (plain
#: content), "error" ((code, reason)), "dropout" (None), or, when the worker did not answer,
#: "timeout" or "died" (a reason; the node state is then None: it stays as it was)
Outcome = tuple[str, object, NodeState | None, float]

_APP = None  # the worker's ClientApp
_READY = "ready"  # what a worker sends once it has imported the ClientApp
_STOP_GRACE = 5.0  # seconds an idle worker is given to exit when the pool closes


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


def _state_plain(state: RecordDict) -> NodeState:
    return {k: rec.to_torch_state_dict() for k, rec in state.array_records.items()}


def _init(app_ref: str) -> None:
    global _APP
    module, attr = app_ref.split(":")
    _APP = getattr(importlib.import_module(module), attr)


def _serve(request: dict, content: Plain, state: NodeState) -> Outcome:
    """In a worker: one message to the ClientApp. Returns (what, payload, node state, seconds):
    ("reply", plain content), ("error", (code, reason)) or ("dropout", None)."""
    act_as_superlink(request["run_id"])  # as in the parent process
    msg = Message(
        from_plain(content, by_reference=not request["check_wire"]),
        dst_node_id=request["node"],
        message_type=request["message_type"],
        group_id=request["group_id"],
    )
    assign_message_id(msg, request["message_id"])
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


def _work(app_ref: str, conn: Connection) -> None:
    """A worker's life: import the ClientApp, say so, then answer one message after another
    until the pool closes the pipe."""
    _init(app_ref)
    conn.send(_READY)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the pool closed its end
            return
        conn.send(_serve(*job))


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


class _Worker:
    """One spawned process and its own pipe, so that it can be killed and replaced alone."""

    def __init__(self, app_ref: str):
        spawn = mp.get_context("spawn")
        self.conn, theirs = spawn.Pipe()
        # not a daemon, as the executor's workers were not: a ClientApp may start processes
        self.process = spawn.Process(target=_work, args=(app_ref, theirs))
        self.process.start()
        theirs.close()  # its end lives in the process alone now: its death closes the pipe
        self.ready = False

    def send(self, job: tuple) -> None:
        """Hand over a message once the worker has imported the ClientApp (a ClientApp that
        cannot be imported is no client's fault: RuntimeError)."""
        if not self.ready:
            try:
                self.conn.recv()  # _READY
            except (EOFError, OSError):
                reason = _exit_reason(self.stop())
                raise RuntimeError(
                    f"a worker process could not start the ClientApp ({reason}); see its "
                    "traceback above"
                ) from None
            self.ready = True
        with contextlib.suppress(OSError):  # it died since: answered() says so
            self.conn.send(job)

    def answered(self, deadline: float | None) -> bool:
        """Wait until the worker answers or dies (True), or ``deadline`` passes (False)."""
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return bool(wait([self.conn, self.process.sentinel], left))

    def answer(self) -> Outcome | None:
        """The worker's answer, or None if it died first (or while sending it)."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):  # a dead worker's pipe, or a reply's tensors died with it
            return None

    def stop(self, grace: float = 0.0) -> int | None:
        """Close the pipe (an idle worker then exits), kill the process if it is still there
        after ``grace`` seconds; its exit code."""
        self.conn.close()
        self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        return self.process.exitcode


@dataclass(frozen=True)
class Job:
    """A message in a worker: which worker slot, and when its client is stopped."""

    slot: int
    started: float  # time.monotonic()
    deadline: float | None


class WorkerPool:
    """``workers`` spawned worker processes that run a ClientApp (named ``module:attribute``),
    one message each at a time. A worker that dies or overruns its message's deadline is
    replaced by a fresh process; the others go on."""

    def __init__(self, workers: int, app_ref: str):
        self.workers = workers
        self._app_ref = app_ref
        self._slots = [_Worker(app_ref) for _ in range(workers)]
        self._busy: set[int] = set()

    def submit(
        self, msg: Message, context: Context, check_wire: bool, timeout: float | None = None
    ) -> Job:
        """Send ``msg`` to an idle worker (one must be: :meth:`result` frees its worker); its
        client is stopped if it runs longer than ``timeout`` seconds."""
        slot = min(set(range(self.workers)) - self._busy)
        if not self._slots[slot].process.is_alive():  # it died idle: no client need fail
            self._replace(slot)
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
        self._slots[slot].send((request, to_plain(msg.content), _state_plain(context.state)))
        self._busy.add(slot)
        started = time.monotonic()
        return Job(slot, started, None if timeout is None else started + timeout)

    def result(self, job: Job) -> Outcome:
        """What became of the job's message (waiting for it): the worker's outcome, or
        "timeout" (it still ran at the deadline) or "died"; in both, a fresh worker takes the
        slot."""
        worker = self._slots[job.slot]
        answered = worker.answered(job.deadline)
        self._busy.discard(job.slot)
        if answered and (outcome := worker.answer()) is not None:
            return outcome
        exitcode = self._replace(job.slot)
        seconds = time.monotonic() - job.started
        if not answered:
            return "timeout", f"still running after {seconds:.1f} s: stopped", None, seconds
        return "died", f"its worker process died ({_exit_reason(exitcode)})", None, seconds

    def _replace(self, slot: int) -> int | None:
        """Kill the slot's worker (if it still runs) for a fresh one; the old one's exit code."""
        exitcode = self._slots[slot].stop()
        self._slots[slot] = _Worker(self._app_ref)
        return exitcode

    @staticmethod
    def restore_state(context: Context, state: Mapping[str, dict[str, torch.Tensor]]) -> None:
        """Put a worker's node state back into the node's Context."""
        for key in list(context.state.array_records):
            del context.state[key]
        for key, tensors in state.items():
            context.state[key] = ArrayRecord(tensors)

    def close(self) -> None:
        """Stop every worker: an idle one exits when its pipe closes, one still busy (the run
        failed) is killed at once."""
        for slot, worker in enumerate(self._slots):
            worker.stop(0.0 if slot in self._busy else _STOP_GRACE)
