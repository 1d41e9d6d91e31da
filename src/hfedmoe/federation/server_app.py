"""The Flower ServerApp: the federated round loop, with central evaluation and results.

The loop is written out (rather than ``Strategy.start``) so each round's record is written at
the top level as soon as the round ends, and so a run can later resume from any round.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from transformers import PreTrainedModel

from hfedmoe.algorithms import FederatedAlgorithm, build_algorithm
from hfedmoe.algorithms.mechanics.validation import all_finite
from hfedmoe.budget import minimum_budget
from hfedmoe.federation import evaluation, wire
from hfedmoe.federation.evaluation import FederatedEvaluation
from hfedmoe.federation.strategy import AlgorithmStrategy, Folded
from hfedmoe.federation.workload import ServerWorkload, server_workload
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.errors import ConfigError, HFedMoEError
from hfedmoe.foundation.memory import return_freed_memory
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.state import load_shared_state, shared_state
from hfedmoe.results import RunRecorder
from hfedmoe.results.run_state import RunState, has_checkpoint, load_run_state, save_run_state
from hfedmoe.training import EvalResult, evaluate, loss_gradient
from hfedmoe.training.personal import personal_models, personalised

log = logging.getLogger("hfedmoe")

app = ServerApp()

NodeStates = dict[int, dict[str, dict[str, torch.Tensor]]]  # node -> record name -> tensors


@runtime_checkable
class ResumableGrid(Protocol):
    """A Grid that can read and restore what every node keeps in its Context between rounds.

    Resuming a run needs it: the embedded engine (``hfedmoe.engines.embedded``) is one. On
    Flower's own engines node ids and node state live in other processes and do not survive a
    restart, so their runs do not resume.
    """

    def node_states(self) -> NodeStates: ...

    def restore_node_states(self, states: NodeStates) -> None: ...


@runtime_checkable
class StreamingGrid(Protocol):
    """A Grid whose ``send_and_receive`` yields the replies in message order as they are read,
    running each node then (the embedded engine)."""

    streams_replies: bool


def receive(
    grid: Grid, messages: list[Message], timeout: float | None, interval: float
) -> Iterator[Message]:
    """The replies to ``messages``, in message order, each as soon as it and every reply before
    it have arrived, so the server folds them as they come (a reply that never comes holds the
    later ones back until ``timeout``; then what arrived follows, in order).

    Written here because Flower's ``Grid.send_and_receive`` returns all replies at once, after
    polling every 3 s; this one polls every ``interval`` seconds (``federation.poll_interval``).
    """
    if isinstance(grid, StreamingGrid):
        yield from grid.send_and_receive(messages, timeout=timeout)
        return
    ids = list(grid.push_messages(messages))
    position = {message_id: i for i, message_id in enumerate(ids)}
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting, arrived, next_up = set(ids), {}, 0
    while True:
        for reply in grid.pull_messages(sorted(waiting)):
            i = position.get(reply.metadata.reply_to_message_id)
            if i is not None and ids[i] in waiting:
                waiting.discard(ids[i])
                arrived[i] = reply
        while next_up in arrived:
            yield arrived.pop(next_up)
            next_up += 1
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(interval)
    for i in sorted(arrived):
        yield arrived.pop(i)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, run_dir = wire.run_config(context.run_config)
    resume, restart = None, False
    if context.run_config.get(wire.RESUME):
        if not isinstance(grid, ResumableGrid):  # node ids and node state do not survive
            raise ConfigError("resume: only runs of the embedded engine (hfedmoe run) resume")
        if has_checkpoint(run_dir):
            resume = load_run_state(run_dir)
        else:  # killed before round 0's checkpoint was complete: start over, in place
            log.info("no checkpoint yet in %s: the run starts over", run_dir)
            restart = True
    recorder = RunRecorder(run_dir, cfg, resume, restart)
    by_reference = bool(context.run_config.get(wire.BY_REFERENCE, False))
    federate(grid, cfg, recorder, resume=resume, by_reference=by_reference)


def federate(
    grid: Grid,
    cfg: ExperimentConfig,
    recorder: RunRecorder,
    timeout: float = 3600,
    resume: RunState | None = None,
    by_reference: bool = False,
) -> dict:
    """Run ``cfg.federation.rounds`` rounds over ``grid``; return the run summary.

    The global weights are the server model's own tensors (``wire.TensorRecord``: no copy);
    ``by_reference``: the clients share this process and receive them by reference.

    After every round the run state is checkpointed (``hfedmoe.results.run_state``); with
    ``resume`` the loop continues from the checkpoint's round with the same weights, algorithm
    state, node state and devices, and ends exactly where an uninterrupted run ends.
    """
    if cfg.trim_memory:  # in this process, as each client does in its own
        return_freed_memory()
    if cfg.threads:  # with worker processes the server's evaluation runs while they wait
        torch.set_num_threads(cfg.threads * cfg.federation.workers)
    server = _Server.set_up(grid, cfg, recorder, timeout, resume, by_reference)
    if resume is None:
        excluded = server.admit_nodes()  # 1. ask every node for its device and budget
        server.record_round_zero(excluded)  # 2. the initial model, evaluated
    else:
        server.restore(resume)  # 1-2. as the checkpoint left them
    for server_round in range((resume.round if resume else 0) + 1, cfg.federation.rounds + 1):
        server.run_round(server_round)  # 3. train, fold, evaluate, record, checkpoint
    return recorder.finish(server.model, server.workload.tokenizer)


@dataclass
class _Server:
    """What the server holds across a run's rounds, and its steps (:func:`federate`)."""

    grid: Grid
    cfg: ExperimentConfig
    recorder: RunRecorder
    workload: ServerWorkload
    algorithm: FederatedAlgorithm
    strategy: AlgorithmStrategy
    timeout: float  # for the budget query
    round_timeout: float
    by_reference: bool
    start: float  # perf_counter at the run's start, less the time before a resume
    arrays: wire.TensorRecord | None = None  # the global weights: the model's own tensors

    @classmethod
    def set_up(
        cls,
        grid: Grid,
        cfg: ExperimentConfig,
        recorder: RunRecorder,
        timeout: float,
        resume: RunState | None,
        by_reference: bool,
    ) -> _Server:
        """The model, the algorithm bound to it and the strategy around the algorithm."""
        start = time.perf_counter() - (resume.elapsed_seconds if resume else 0.0)
        workload = server_workload(cfg)
        algorithm = build_algorithm(cfg)
        algorithm.bind(workload.model)
        if resume is None:  # before the round-0 checkpoint, so that a resume draws the same
            algorithm.draw_secret()
        strategy = AlgorithmStrategy(algorithm, cfg, by_reference)
        strategy.spec = algorithm.upload_spec(workload.model)
        round_timeout = cfg.federation.round_timeout or timeout
        server = cls(
            grid, cfg, recorder, workload, algorithm, strategy, timeout, round_timeout,
            by_reference, start,
        )  # fmt: skip
        server.arrays = wire.TensorRecord(shared_state(workload.model))
        return server

    @property
    def model(self) -> PreTrainedModel:
        return self.workload.model

    def admit_nodes(self) -> list[dict]:
        """Ask every node for its device before round 1 (``query_devices``); the nodes left
        out, with why."""
        em = ExpertModel(self.model)
        fed = self.cfg.federation
        admission = Admission(
            minimum_budget(em.num_layers, self.algorithm.holds_subset),
            em.num_layers * em.num_experts,
            fed.num_clients,
            self.workload.partition_sizes,
        )
        devices, excluded = query_devices(
            self.grid, admission, self.timeout, fed.clients_per_round, fed.poll_interval
        )
        self.strategy.set_devices(devices, self.workload.partition_sizes)
        return excluded

    def restore(self, resume: RunState) -> None:
        """The devices, weights, algorithm state and node state of a checkpoint."""
        devices = {d.pop("node_id"): wire.DeviceReport(**d) for d in resume.devices}
        self.strategy.set_devices(devices, self.workload.partition_sizes)
        load_shared_state(self.model, resume.weights)
        self.algorithm.restore_state(resume.algorithm)
        if isinstance(self.grid, ResumableGrid):
            self.grid.restore_node_states(resume.nodes)
        self.arrays = wire.TensorRecord(shared_state(self.model))
        log.info("resuming after round %d of %d", resume.round, self.cfg.federation.rounds)

    def record_round_zero(self, excluded: list[dict]) -> None:
        """Round 0: the initial model evaluated, the devices, the nodes left out."""
        cfg, model, workload = self.cfg, self.model, self.workload
        initial, fed = _central(model, workload, cfg), self.federated(0)
        validation = _validate(model, workload, cfg)
        elapsed = time.perf_counter() - self.start
        record = _round_record(0, _test_result(initial, fed), None, [], 0.0, elapsed, validation)
        record.update(_per_client(initial, fed, workload, cfg, []))
        if initial is not None and fed is None:  # else: the clients' own (federated)
            args = (self.algorithm, self.grid, self.strategy.nodes, initial, [])
            record.update(_personal_models(model, workload, cfg, *args))
        record["devices"] = self.strategy.device_records()
        if excluded:
            record["excluded"] = excluded
        self.recorder.log_round(record)
        self.checkpoint(0)

    def train(self, server_round: int) -> tuple[bool, Folded]:
        """Send the round's requests, fold the replies as they come, and take the new global
        weights into the model: whether anything was aggregated (else the model stays), and
        the round's outcome without the weights (the model holds the only copy)."""
        cfg, strategy = self.cfg, self.strategy
        started = time.perf_counter()
        if cfg.federation.descent_check:  # the reference every reply's direction is checked on
            assert self.workload.validation is not None, "the config requires a validation split"
            gradient = loss_gradient(
                self.model, self.workload.validation, cfg.eval.batch_size, cfg.train.device
            )
            if all(all_finite(g) for g in gradient.values()):
                strategy.descent = gradient
            else:  # no direction to judge by: the check would reject every reply
                log.warning(
                    "round %d: the validation gradient is not finite; no descent check this round",
                    server_round,
                )
        descent_seconds = time.perf_counter() - started
        messages = strategy.configure_train(server_round, self.arrays, ConfigRecord(), self.grid)
        replies = receive(
            self.grid, list(messages), self.round_timeout, cfg.federation.poll_interval
        )
        folded = strategy.fold(server_round, replies)
        del replies, messages
        strategy.descent = None
        aggregated = folded.arrays is not None
        if folded.arrays is not None:
            load_shared_state(self.model, folded.arrays.to_torch_state_dict())
            self.arrays = wire.TensorRecord(shared_state(self.model))  # the model's only copy
        folded = dataclasses.replace(folded, arrays=None, descent_seconds=descent_seconds)
        if not self.by_reference:  # serialised messages live in Flower's reference cycles (a
            gc.collect()  # RecordDict's synced views): free this round's copies now
        return aggregated, folded

    def run_round(self, server_round: int) -> None:
        """One round: train and fold, evaluate, record, checkpoint."""
        cfg, model, workload = self.cfg, self.model, self.workload
        round_start = time.perf_counter()
        aggregated, folded = self.train(server_round)
        eval_start = time.perf_counter()
        central = _central(model, workload, cfg)
        eval_seconds = time.perf_counter() - eval_start
        validation = _validate(model, workload, cfg)
        validation_seconds = time.perf_counter() - eval_start - eval_seconds
        fed = self.federated(server_round)
        federated_seconds = time.perf_counter() - eval_start - eval_seconds - validation_seconds
        result = _test_result(central, fed)
        train = dict(folded.metrics) if aggregated else {}
        train_loss = float(train.pop("train_loss")) if "train_loss" in train else None
        now = time.perf_counter()
        record = _round_record(
            server_round,
            result,
            train_loss,
            folded.reports,
            now - round_start,
            now - self.start,
            validation,
        )
        record.update(train)  # what the defences did: groups clipped, shares capped
        record.update(_per_client(central, fed, workload, cfg, record["clients"]))
        if central is not None and fed is None:  # else: the clients' own (federated)
            nodes, clients = self.strategy.nodes, record["clients"]
            record.update(
                _personal_models(
                    model, workload, cfg, self.algorithm, self.grid, nodes, central, clients
                )
            )
        if aggregated:  # what the algorithm says about this round's aggregation
            record.update(self.algorithm.round_metrics())
        if folded.rejected:
            record["aggregate_rejected"] = True
        record["eval_seconds"] = eval_seconds  # where the round's time went (bench/lean.py)
        if validation is not None:
            record["validation_seconds"] = validation_seconds
        if fed is not None:
            record["federated_seconds"] = federated_seconds
        record["aggregate_seconds"] = folded.seconds
        if cfg.federation.descent_check:
            record["descent_seconds"] = folded.descent_seconds
        self.recorder.log_round(record)
        self.checkpoint(server_round)
        log.info(
            "round %d/%d  test_accuracy=%s  test_loss=%s  train_loss=%s  (%.1fs)",
            server_round,
            cfg.federation.rounds,
            _shown(result.accuracy),
            _shown(result.loss),
            "n/a" if train_loss is None else f"{train_loss:.4f}",
            now - round_start,
        )

    def federated(self, server_round: int) -> FederatedEvaluation | None:
        """The clients' evaluation of the current global model (``eval.mode``)."""
        cfg, strategy = self.cfg, self.strategy
        if cfg.eval.mode == "central":
            return None
        asked = evaluation.evaluators(cfg, server_round, strategy.sampled, strategy.nodes)
        weights = wire.tensor_record(shared_state(self.model), self.by_reference)
        messages = evaluation.requests(weights, server_round, strategy.nodes, asked)
        replies = receive(self.grid, messages, self.round_timeout, cfg.federation.poll_interval)
        fraction = cfg.data.client_test_fraction
        return evaluation.read(replies, asked, strategy.nodes, strategy.examples, fraction)

    def checkpoint(self, server_round: int) -> None:
        """The run state after ``server_round``, written atomically."""
        assert self.arrays is not None
        nodes = self.grid.node_states() if isinstance(self.grid, ResumableGrid) else {}
        state = RunState(
            server_round,
            self.arrays.to_torch_state_dict(),
            self.algorithm.checkpoint_state(),
            nodes,
            self.strategy.device_records(),
            self.recorder.rounds,
            time.perf_counter() - self.start,
        )
        save_run_state(self.recorder.run_dir, state)


def wait_for_nodes(grid: Grid, num_nodes: int, timeout: float) -> list[int]:
    """The node ids once ``num_nodes`` nodes are connected (in a deployment SuperNodes join
    over time); an error naming how many came if they do not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_nodes:
        if time.monotonic() > deadline:
            raise HFedMoEError(
                f"federation.num_clients: {num_nodes} clients expected, {len(nodes)} node(s) "
                f"connected within {timeout:.0f} s"
            )
        time.sleep(1.0)
    return nodes


@dataclass(frozen=True)
class Admission:
    """What a node's answer to the budget query must say to take part: it can train ``need``
    experts per batch of a model of ``num_experts`` (L x E), holds a partition of
    0..``num_clients``-1 and, where the server made the partitions, declares that partition's
    size (``known_examples``)."""

    need: int
    num_experts: int
    num_clients: int
    known_examples: tuple[int, ...] | None = None

    def refuse(self, d: wire.DeviceReport) -> str | None:
        """Why a node that answered ``d`` cannot take part, or None."""
        if d.num_experts != self.num_experts:
            return f"reports {d.num_experts} experts; the model has {self.num_experts}"
        if d.num_partitions not in (0, self.num_clients):
            return (
                f"node config num-partitions is {d.num_partitions}, expected "
                f"federation.num_clients = {self.num_clients}"
            )
        if d.partition_id >= self.num_clients:
            return f"partition {d.partition_id} is not a client (expected < {self.num_clients})"
        if d.expert_budget < self.need:
            return (
                f"device tier '{d.tier}' ({d.memory_bytes / 2**30:.2f} GiB) cannot train even "
                f"{self.need} expert(s) per batch of this model"
            )
        known = self.known_examples[d.partition_id] if self.known_examples else None
        if known is not None and d.num_examples not in (0, known):
            return f"declares {d.num_examples} examples; its partition has {known}"
        if known is None and d.num_examples <= 0:
            return "declares no training examples"
        return None


def query_devices(
    grid: Grid,
    admission: Admission,
    timeout: float,
    min_nodes: int = 1,
    interval: float = 0.5,
) -> tuple[dict[int, wire.DeviceReport], list[dict]]:
    """Ask every node for its device, C_budget and |D_c| (before round 1), once
    ``admission.num_clients`` are connected. A node whose answer is an error, malformed, late,
    or refused by ``admission`` (or that claims another node's partition) is left out of the run
    with a reason; the run goes on if at least ``min_nodes`` remain. Returns the admitted
    devices by node id and the left-out nodes (``node_id``, ``reason``)."""
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type=wire.BUDGET_QUERY, group_id="0")
        for node in sorted(wait_for_nodes(grid, admission.num_clients, timeout))
    ]
    devices: dict[int, wire.DeviceReport] = {}
    refused: dict[int, str] = {}
    for reply in receive(grid, messages, timeout, interval):
        node = reply.metadata.src_node_id
        if node in devices or node in refused:
            continue
        try:
            if reply.has_error():
                raise ValueError(f"budget query failed: {reply.error.reason}")
            device = wire.unpack_device(reply.content)
        except Exception as exc:  # an untrusted answer: whatever it holds, the node is left out
            refused[node] = str(exc) if isinstance(exc, ValueError) else f"malformed: {exc!r}"
            continue
        if reason := admission.refuse(device):
            refused[node] = reason
        else:
            devices[node] = device
    for message in messages:
        node = message.metadata.dst_node_id
        if node not in devices and node not in refused:
            refused[node] = "no answer to the budget query in time"
    by_partition: dict[int, list[int]] = {}
    for node, d in devices.items():
        by_partition.setdefault(d.partition_id, []).append(node)
    for partition, nodes in by_partition.items():
        if len(nodes) > 1:  # nobody can tell which one holds it: neither takes part
            for node in nodes:
                refused[node] = f"nodes {nodes} all claim partition {partition}"
                del devices[node]
    excluded = [{"node_id": n, "reason": r} for n, r in sorted(refused.items())]
    for row in excluded:
        log.warning("node %d is left out of the run: %s", row["node_id"], row["reason"])
    if len(devices) < min_nodes:
        reasons = "; ".join(f"node {row['node_id']}: {row['reason']}" for row in excluded)
        raise HFedMoEError(
            f"federation.clients_per_round: {min_nodes} nodes needed, {len(devices)} can take "
            f"part ({reasons})"
        )
    log.info(
        "how many experts each node's device can train per batch (node: experts): %s",
        {n: d.expert_budget for n, d in devices.items()},
    )
    return devices, excluded


def _central(model, workload: ServerWorkload, cfg: ExperimentConfig) -> EvalResult | None:
    """The global model on the server's test split; None with eval.mode = "federated"."""
    if cfg.eval.mode == "federated":
        return None
    assert workload.test is not None
    return evaluate(model, workload.test, cfg.eval.batch_size, cfg.train.device)


def _test_result(central: EvalResult | None, fed: FederatedEvaluation | None) -> EvalResult:
    """What a round records as test_*: the central evaluation, or the clients' weighted mean
    where the server evaluates nothing itself (None where no client answered)."""
    if central is not None:
        return central
    assert fed is not None
    return EvalResult(fed.mean("accuracy"), fed.mean("loss"), fed.examples)  # type: ignore[arg-type]


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _per_client(
    central: EvalResult | None,
    fed: FederatedEvaluation | None,
    workload: ServerWorkload,
    cfg: ExperimentConfig,
    clients: list[dict],
) -> dict:
    """Every client's accuracy and loss on its own data: what it said itself where clients
    evaluate (``eval.mode``; NaN for a client not asked this round), else the global model on
    the test split reweighted to its own distribution (``hfedmoe.training.personal``). The
    list, the mean and the worst client; each sampled client's row gets its own; with
    federated evaluation, the ``federated_*`` keys too."""
    if fed is not None:
        n = cfg.federation.num_clients
        view = _client_view("personal", *fed.per_client(n), clients)
        if fed.has_personal:  # each client's own model, measured on its own data
            view |= _client_view("personal_model", *fed.per_client(n, personal=True), clients)
        return {**fed.record(), **view}
    assert central is not None
    return _client_view("personal", *_global_per_client(central, workload), clients)


def _global_per_client(result, workload) -> tuple[np.ndarray, np.ndarray]:
    """Every client's accuracy and loss (C,) on its own distribution's test data, from one
    evaluation of the global model (``hfedmoe.training.personal``)."""
    acc_C = personalised(result.accuracy_N, workload.test_keys, workload.client_shares)
    loss_C = personalised(result.loss_N, workload.test_keys, workload.client_shares)
    return acc_C, loss_C


def _personal_models(model, workload, cfg, algorithm, grid, nodes, result, clients) -> dict:
    """Where the algorithm keeps a personal model per client
    (``FederatedAlgorithm.personal_weights``) and the grid holds each node's state (a
    :class:`ResumableGrid`: the embedded engine), every client's personal model on its own
    distribution's test data, as ``personal_model_*`` beside the global model's ``personal_*``
    (:func:`_per_client`); ``nodes``: client -> its node. A client whose node keeps nothing
    yet has the global model's.

    One client at a time, in the server's model (``training.personal.personal_models``): the
    peak is that one model plus one client's replaced tensors (FLEX-MoE: its routers)."""
    if not isinstance(grid, ResumableGrid):
        return {}
    global_weights = shared_state(model)
    if algorithm.personal_weights(global_weights, {}) is None:  # no personal models
        return {}
    started = time.perf_counter()
    states = grid.node_states()
    personal = {}
    for client, node in nodes.items():
        memory = states.get(node, {}).get(wire.MEMORY, {})
        if weights := algorithm.personal_weights(global_weights, memory):
            personal[client] = weights
    acc_C, loss_C = _global_per_client(result, workload)  # the clients without a model of their own
    test, keys, shares = workload.test, workload.test_keys, workload.client_shares
    batch, device = cfg.eval.batch_size, cfg.train.device
    for client, (acc, loss) in personal_models(
        model, test, keys, shares, personal, batch, device
    ).items():
        acc_C[client], loss_C[client] = acc, loss
    view = _client_view("personal_model", acc_C, loss_C, clients)
    return {**view, "personal_eval_seconds": time.perf_counter() - started}


def _client_view(prefix: str, acc_C: np.ndarray, loss_C: np.ndarray, clients: list[dict]) -> dict:
    """Per-client accuracies and losses (C,) as a round records them under ``prefix``: the
    list, the mean and the worst client; each sampled client's row gets its own."""
    for row in clients:
        if row.get("partition_id") is not None:
            row[f"{prefix}_accuracy"] = float(acc_C[row["partition_id"]])
            row[f"{prefix}_loss"] = float(loss_C[row["partition_id"]])
    finite = acc_C[np.isfinite(acc_C)]
    return {
        f"{prefix}_accuracy_mean": float(finite.mean()) if len(finite) else None,
        f"{prefix}_accuracy_worst": float(finite.min()) if len(finite) else None,
        f"{prefix}_loss_mean": float(np.nanmean(loss_C)) if len(finite) else None,
        f"{prefix}_accuracy": [None if not np.isfinite(a) else float(a) for a in acc_C],
    }


def _validate(
    model: torch.nn.Module, workload: ServerWorkload, cfg: ExperimentConfig
) -> EvalResult | None:
    """The global model on the validation split; None for a run without one."""
    if workload.validation is None:
        return None
    return evaluate(model, workload.validation, cfg.eval.batch_size, cfg.train.device)


def _evaluation(split: str, result: EvalResult) -> dict:
    """``result`` as a round record's keys for ``split`` (test, validation): accuracy and loss,
    and the per-group metrics and perplexity where the task gives them."""
    return {
        f"{split}_accuracy": result.accuracy,
        f"{split}_loss": result.loss,
        **({f"{split}_accuracy_by_group": result.by_group} if result.by_group else {}),
        **({f"{split}_loss_by_group": result.loss_by_group} if result.loss_by_group else {}),
        **({f"{split}_perplexity": result.perplexity} if result.perplexity is not None else {}),
    }


def _round_record(
    server_round, result, train_loss, reports, round_seconds, elapsed, validation=None
) -> dict:
    """A round's line of metrics.jsonl; ``validation``: the validation split's result, whose
    keys follow the test split's (a run without one has none of them)."""
    ok = [r for r in reports if r.status == "ok"]
    return {
        "round": server_round,
        **_evaluation("test", result),
        **({} if validation is None else _evaluation("validation", validation)),
        "train_loss": train_loss,
        "clients_ok": len(ok),
        "clients_failed": len(reports) - len(ok),
        "failures": dict(Counter(r.failure for r in reports if r.status != "ok")),
        "examples": sum(r.num_examples for r in ok),
        "bytes_down": sum(r.bytes_down for r in reports),
        "bytes_up": sum(r.bytes_up for r in reports),
        "round_seconds": round_seconds,
        "elapsed_seconds": elapsed,
        "clients": [r.to_dict() for r in reports],
    }
