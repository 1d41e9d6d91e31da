"""A Flower Strategy that carries any :class:`~hfedmoe.algorithms.FederatedAlgorithm`.

It samples clients, turns the algorithm's per-client tasks into messages, and turns the
replies back into updates for the algorithm's aggregation; it does no arithmetic itself.
Every reply is checked whole before anything reads it (``wire.unpack_update`` for its shape,
``hfedmoe.algorithms.mechanics.validation`` for its content, against what the server asked and
knows): an error, a malformed or rejected reply, or no reply at all makes that client a failure
with a reason, nothing a reply holds can raise out of :meth:`AlgorithmStrategy.fold`, and only
the accepted updates are aggregated. With ``federation.defences`` a client's weight is the
number of examples the server knows it holds, not the number it reports. A round's outcome,
every client's report included, is what :meth:`AlgorithmStrategy.fold` returns (:class:`Folded`);
Flower's ``aggregate_train`` is the same fold, reduced to the weights and the metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hfedmoe.algorithms import Aggregation, ClientUpdate, FederatedAlgorithm, Weights
from hfedmoe.algorithms.maths import accounting
from hfedmoe.algorithms.mechanics.uploads import UploadSpec
from hfedmoe.algorithms.mechanics.validation import Expectation, all_finite, check_update
from hfedmoe.federation import wire
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.errors import HFedMoEError

log = logging.getLogger("hfedmoe")


@dataclass
class ClientReport:
    """One sampled client's outcome in one round (a row of clients.csv)."""

    round: int
    node_id: int
    bytes_down: int
    status: str = "ok"  # "ok" | "failed"
    # why it failed: "budget" (asked beyond its device), "error" (raised), "no-reply" (none
    # before the round's timeout), "malformed", or a rejection (validation.Rejection.reason)
    failure: str = ""
    error: str = ""
    partition_id: int | None = None
    tier: str = ""  # the device tier ("" = unlimited)
    expert_budget: int | None = None  # C_budget(c), from the device
    requested_experts: int | None = None  # experts per batch the request asked for
    num_examples: int = 0
    train_loss: float | None = None
    seconds: float | None = None
    steps: int | None = None  # local optimizer steps
    bytes_up: int = 0
    # the three participation sets of METHOD.md §10, as sizes over the round
    experts_routed: int | None = None  # routed to in >= 1 batch (union of E_union)
    experts_updated: int | None = None  # updated in >= 1 batch (union of E_active)
    experts_used: int | None = None  # reported as used: u_c(e) >= tau (HFedMoE)
    usage_seconds: float | None = None  # HFedMoE: the extra pass over D_c for eq. (16)
    experts_routed_per_step: float | None = None  # mean |E_union| per local batch
    max_active_per_step: int | None = None  # the most experts updated on one batch
    top_k: int | None = None  # experts per token, where the client's budget sets it (FFT-MoE)
    memory_predicted_bytes: float | None = None  # training's extra memory, cost model
    memory_measured_bytes: float | None = None  # peak RSS increase while training
    step_flops_predicted: float | None = None
    # forward passes outside the training steps on the round's critical path (HFedMoE's eq.
    # (16) pass, FLUX's probes and its profiling where it is not stale), by the cost model;
    # FLUX's stale profiling, which overlaps aggregation, is its overlapped_flops_predicted
    extra_flops_predicted: float | None = None
    # bytes of the weights the client held while training (FLUX: merged experts in place of
    # the non-tuned ones, with the cost model's prediction and the whole model's)
    memory_held_bytes: float | None = None
    memory_held_predicted_bytes: float | None = None
    memory_unmerged_bytes: float | None = None
    experts_merged: int | None = None  # FLUX: merged experts the client built
    # HFedMoE: the share of the experts it updated that are among its most-used by eq. (16)
    active_usage_overlap: float | None = None
    expert_updates: list[int] | None = None  # batches each expert was updated in, L x E flat
    clipped: int = 0  # groups pulled back to the update bound (federation.update_bound = clip)
    bound_ratio: float | None = None  # its groups' largest distance over their update bound
    #: its cosine with the validation loss's descent direction (federation.descent_check)
    descent_cosine: float | None = None
    #: the algorithm's other declared metrics (a plugin's, FLUX's expert roles), as reported
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        row = asdict(self)
        metrics = row.pop("metrics")
        return {**row, **metrics}


@dataclass(frozen=True)
class Folded:
    """What one round's replies gave: the next global weights (None: nothing accepted, or an
    aggregate that was not finite and so refused), the round's training metrics (the mean
    training loss, what the defences and the privacy mechanism did), every sampled client's
    report in client order, the seconds the aggregation's arithmetic took and those the
    server's reference gradient took (``federation.descent_check``; set by the server)."""

    arrays: ArrayRecord | None
    metrics: dict[str, float]
    reports: list[ClientReport]
    rejected: bool
    seconds: float
    descent_seconds: float = 0.0


def _describe(report: ClientReport, update: ClientUpdate, partition_id: int, bytes_up: int) -> None:
    """Fill ``report`` from an accepted update's metrics."""
    m = update.metrics
    if report.partition_id is None:  # known from the budget query, else as the client says
        report.partition_id = partition_id
    report.num_examples = update.num_examples
    report.train_loss = m.get("train_loss")
    report.seconds = m.get("train_seconds")
    report.steps = _int_or_none(m.get("steps"))
    report.bytes_up = bytes_up
    report.experts_routed = _int_or_none(m.get("experts_routed"))
    report.experts_updated = _int_or_none(m.get("experts_updated"))
    report.experts_used = _int_or_none(m.get("experts_used"))
    report.usage_seconds = m.get("usage_seconds")
    report.experts_routed_per_step = m.get("experts_routed_per_step")
    report.max_active_per_step = _int_or_none(m.get("max_active_per_step"))
    report.top_k = _int_or_none(m.get("top_k"))
    report.memory_predicted_bytes = m.get("memory_predicted_bytes")
    report.memory_measured_bytes = m.get("memory_measured_bytes")
    report.step_flops_predicted = m.get("step_flops_predicted")
    report.extra_flops_predicted = m.get("extra_flops_predicted")
    report.memory_held_bytes = m.get("memory_held_bytes")
    report.memory_held_predicted_bytes = m.get("memory_held_predicted_bytes")
    report.memory_unmerged_bytes = m.get("memory_unmerged_bytes")
    report.experts_merged = _int_or_none(m.get("experts_merged"))
    report.active_usage_overlap = m.get("active_usage_overlap")
    if "expert_updates" in update.stats:
        report.expert_updates = update.stats["expert_updates"].long().flatten().tolist()
    known = {f.name for f in dataclasses.fields(ClientReport)} | {"train_seconds"}
    report.metrics = {k: v for k, v in sorted(m.items()) if k not in known}


def _int_or_none(x: float | None) -> int | None:
    return None if x is None else int(x)


#: a declared size counts at most this many times the median declared size (by default)
DECLARED_SIZE_FACTOR = 4


def declared_size_cap(declared: Sequence[int]) -> int:
    """The default cap on the weight of a size a node declares (``data.clients = "own"``):
    DECLARED_SIZE_FACTOR x the median declared size. The server cannot check a declared size,
    and a node declaring 2^62 examples would otherwise carry the whole aggregate; a minority of
    nodes cannot move the median."""
    return max(1, DECLARED_SIZE_FACTOR * int(np.median(declared)))


def sample_clients(clients: Iterable[int], k: int, rng: np.random.Generator) -> list[int]:
    """``k`` client ids drawn without replacement with ``rng`` (the algorithm's
    ``sampling_rng``: for (seed, round), or under ``[privacy]`` for the run's secret)."""
    ordered = sorted(clients)
    return sorted(int(n) for n in rng.choice(ordered, size=min(k, len(ordered)), replace=False))


class AlgorithmStrategy(Strategy):
    """configure_train -> (clients train) -> aggregate_train, for one algorithm.

    The algorithm knows clients by their partition id, which every engine gives the same
    client (Flower's node ids differ between engines and runs); this strategy translates
    between the two with what the nodes said in the budget query (:meth:`set_devices`). So
    the same seed samples, seeds and orders the same clients on every engine.
    """

    def __init__(
        self, algorithm: FederatedAlgorithm, cfg: ExperimentConfig, by_reference: bool = False
    ):
        """``by_reference``: the clients share this process (``wire.TensorRecord``)."""
        self.algorithm = algorithm
        self.cfg = cfg
        self.by_reference = by_reference
        self._global: Weights = {}
        self._global_norms: dict[str, float] = {}
        self._bytes_down: dict[int, int] = {}
        self._requested: dict[int, int | None] = {}
        self.devices: dict[int, wire.DeviceReport] = {}  # node id -> its budget query answer
        self.nodes: dict[int, int] = {}  # client (partition) id -> node id
        self.spec: UploadSpec | None = None  # what clients may upload; None = anything
        #: client -> the |D_c| its replies must state (known or declared before round 1) and
        #: the weight its data carries (that, capped by max_examples_per_client)
        self.examples: dict[int, int] = {}
        self.weights: dict[int, int] = {}
        self._sampled: list[int] = []
        self._configs: dict[int, Mapping[str, object]] = {}  # node -> its request's config
        self._cache: dict = {}  # what this round's replies are checked against (validation)
        #: the validation loss's gradient at this round's global weights, by key: the
        #: reference of federation.descent_check, which the server sets before each round
        self.descent: Weights | None = None

    def set_devices(
        self, devices: dict[int, wire.DeviceReport], known_examples: Sequence[int] | None = None
    ) -> None:
        """The nodes' answers to the budget query, by node id; they name each node's client and
        its |D_c|: ``known_examples[partition]`` where the server made the partitions, else
        what the node declared."""
        self.devices = dict(devices)
        self.nodes = {d.partition_id: node for node, d in self.devices.items()}
        self.algorithm.set_budgets({d.partition_id: d.expert_budget for d in devices.values()})
        cap = self.cfg.federation.max_examples_per_client
        if cap is None and not known_examples and self.cfg.federation.defences and devices:
            cap = declared_size_cap([d.num_examples for d in devices.values()])
        for d in devices.values():
            n = known_examples[d.partition_id] if known_examples else d.num_examples
            self.examples[d.partition_id] = n
            self.weights[d.partition_id] = n if cap is None else min(n, cap)

    @property
    def sampled(self) -> list[int]:
        """The clients the last configured round sampled."""
        return list(self._sampled)

    def summary(self) -> None:
        """Flower calls this to describe the strategy; ours is described by the config."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        self._cache = {}  # validation's norms of this round's global weights
        if not self.nodes:  # no budget query (tests): the node ids serve as client ids
            self.nodes = {n: n for n in grid.get_node_ids()}
        sampled = sample_clients(
            self.nodes,
            self.cfg.federation.clients_per_round,
            self.algorithm.sampling_rng(server_round),
        )
        messages, self._bytes_down, self._requested, self._configs = [], {}, {}, {}
        self._sampled = sampled
        if self.cfg.privacy.enabled:
            self._within_budget(server_round)
        self.algorithm.configure_round(server_round, sampled)
        # weights that several requests share (the same dict), packed once; the dict is kept
        # beside its record so that its id cannot be reused by another client's weights
        packed: dict[int, tuple[Weights, ArrayRecord]] = {}
        for client in sampled:
            node = self.nodes[client]
            request = self.algorithm.configure_client(server_round, self._global, client)
            key = id(request.weights)
            if key not in packed:
                record = wire.tensor_record(request.weights, self.by_reference)
                packed[key] = (request.weights, record)
            content = wire.pack_request(request, server_round, arrays=packed[key][1])
            self._bytes_down[node] = wire.payload_bytes(content)
            self._configs[node] = request.config
            device = self.devices.get(node)
            pool = device.num_experts if device else None
            self._requested[node] = request.requested_experts(pool) if pool else None
            messages.append(
                Message(
                    content,
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's interface to :meth:`fold`: the next global weights and the round's
        metrics (None, None: nothing to aggregate, the model stays)."""
        folded = self.fold(server_round, replies)
        if folded.arrays is None:
            return None, None
        return folded.arrays, MetricRecord(folded.metrics)

    def fold(self, server_round: int, replies: Iterable[Message]) -> Folded:
        """Validate each reply and fold it into the algorithm's aggregation as it comes, so one
        reply is held at a time (the embedded engine runs each client as its reply is read).
        A grid that returns all replies at once gets them folded in client order, so the
        float sums do not depend on arrival order."""
        if isinstance(replies, Sequence):
            replies = sorted(replies, key=lambda r: self._client(r.metadata.src_node_id))
        # under [privacy] every round releases its noise, even with no reply accepted: a round
        # that kept the model exactly would tell whether anyone's reply was accepted
        fold = self._aggregation(server_round) if self.cfg.privacy.enabled else None
        seconds = 0.0  # the aggregation's arithmetic (fold + finish)
        reports, examples, loss_sum, clipped = [], 0, 0.0, 0
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in self._bytes_down or node in {r.node_id for r in reports}:
                log.warning("round %d: a reply from node %d was not asked for", server_round, node)
                continue  # no message of this round went to it, or it answered already
            report = self._report(server_round, node)
            reports.append(report)
            update = self._accept(report, reply)
            if update is not None:
                clipped += report.clipped
                started = time.perf_counter()
                if fold is None:
                    fold = self._aggregation(server_round)
                fold.add(self._client(node), update)
                seconds += time.perf_counter() - started
                examples += update.num_examples
                loss_sum += update.metrics["train_loss"] * update.num_examples
            del reply, update  # nothing keeps a reply alive while the next client trains
        replied = {self._client(r.node_id) for r in reports}
        for client in sorted(set(self._sampled) - replied):
            reports.append(self._report(server_round, self.nodes[client]))
            self._fail(reports[-1], "no-reply", "no reply before the round's timeout")
        reports.sort(key=lambda r: self._client(r.node_id))
        if fold is None:
            return Folded(None, {}, reports, rejected=False, seconds=seconds)
        started = time.perf_counter()
        new_global = fold.finish()
        seconds += time.perf_counter() - started
        if not all(all_finite(t) for t in new_global.values() if t.is_floating_point()):
            # defence in depth: validated updates should never do this; nothing is committed,
            # so the algorithm stays as it was
            log.error("round %d: the aggregate is not finite; the model stays", server_round)
            return Folded(None, {}, reports, rejected=True, seconds=seconds)
        # the server's own record: it never crosses a wire, so it holds the tensors as they are
        metrics: dict[str, float] = {"train_loss": loss_sum / examples} if examples else {}
        metrics["clipped"] = clipped  # no train_loss: a private round that accepted no reply
        if self.cfg.privacy.enabled:
            metrics.update(self._privacy_spent(server_round))
        metrics.update(fold.defence_counts())
        fold.commit()
        return Folded(wire.TensorRecord(new_global), metrics, reports, False, seconds)

    def _aggregation(self, server_round: int) -> Aggregation:
        """The algorithm's fold of this round, or DP-FedAvg's under ``[privacy]`` with the
        denominator fixed at the clients sampled."""
        if not self.cfg.privacy.enabled:
            return self.algorithm.aggregation(server_round, self._global)
        assert self.spec is not None, "a private run needs the upload spec"
        return self.algorithm.private_aggregation(
            server_round, self._global, self.spec, len(self._sampled)
        )

    def _privacy_spent(self, server_round: int) -> dict[str, float]:
        """epsilon at delta after ``server_round`` rounds, over the clients the sampler draws
        from (the nodes admitted before round 1), from dp-accounting."""
        z, delta = self.algorithm.noise_multiplier(), self.algorithm.privacy_delta()
        sample = None if self.cfg.privacy.local else len(self._sampled)
        spent = accounting.epsilon(z, server_round, len(self.nodes), sample, delta)
        return {"dp_epsilon": spent, "dp_delta": delta, "dp_noise_multiplier": z}

    def _within_budget(self, server_round: int) -> None:
        """Stop before a round that would spend more than ``privacy.target_epsilon``: the noise
        was calibrated for the config's clients, and a deployment that admits fewer nodes
        samples each more often."""
        target = self.cfg.privacy.target_epsilon
        if target is None:
            return
        spent = self._privacy_spent(server_round)["dp_epsilon"]
        if spent > target * (1 + 1e-6):
            raise HFedMoEError(
                f"privacy.target_epsilon: round {server_round} would spend epsilon {spent:.4g} "
                f"of the {target:g} allowed ({len(self._sampled)} of {len(self.nodes)} clients "
                f"a round; the noise was calibrated for {self.cfg.federation.num_clients}); "
                f"the run stops after round {server_round - 1}, whose checkpoint and metrics "
                "are kept"
            )

    def _accept(self, report: ClientReport, reply: Message) -> ClientUpdate | None:
        """The reply's update if it is valid, else None with ``report`` failed and why. Nothing
        in a reply raises out of here: whatever a broken or hostile client sends is a failure."""
        try:
            return self._checked(report, reply)
        except Exception as exc:
            self._fail(report, "malformed", f"{type(exc).__name__}: {exc}")
            return None

    def _checked(self, report: ClientReport, reply: Message) -> ClientUpdate | None:
        if reply.has_error():
            code = reply.error.code
            failure = wire.FAILURES.get(code, "error")
            self._fail(report, failure, str(reply.error.reason))
            return None
        bytes_up = wire.payload_bytes(reply.content)  # before unpacking consumes the reply
        update, partition_id = wire.unpack_update(reply.content)
        client = self._client(report.node_id)
        if self.devices and partition_id != client:
            self._fail(report, "partition", f"the reply is partition {partition_id}'s")
            return None
        if self.spec is not None:
            verdict = check_update(
                update, self.spec, self._global, self._expectation(report.node_id), self._cache
            )
            report.descent_cosine = verdict.descent_cosine
            if verdict.update is None:
                assert verdict.rejection is not None
                self._fail(report, verdict.rejection.reason, verdict.rejection.detail)
                return None
            update, report.clipped = verdict.update, verdict.clipped
            report.bound_ratio = verdict.bound_ratio
        weight = self.weights.get(client) if self.cfg.federation.defences else None
        if weight is not None and weight != update.num_examples:  # max_examples_per_client
            update = dataclasses.replace(update, num_examples=weight)
        _describe(report, update, partition_id, bytes_up)
        return update

    def _expectation(self, node: int) -> Expectation:
        """What the server asked of ``node`` this round and knows about it."""
        fed = self.cfg.federation
        defended = fed.defences
        return Expectation(
            steps=self.algorithm.train_settings().local_steps,
            examples=self.examples.get(self._client(node)) if defended else None,
            config=self._configs.get(node, {}),
            bound=self.algorithm.update_bound if defended else None,
            clip=fed.update_bound == "clip",
            max_update_ratio=fed.max_update_ratio,
            noise_std=self.algorithm.client_noise_std(),
            descent=self.descent if fed.descent_check else None,
            min_descent_cosine=fed.min_descent_cosine,
        )

    def device_records(self) -> list[dict]:
        """Every node's device, in client order (the same on every engine)."""
        by_client = sorted(self.devices.items(), key=lambda nd: nd[1].partition_id)
        return [{"node_id": n, **asdict(d)} for n, d in by_client]

    def _client(self, node: int) -> int:
        device = self.devices.get(node)
        return device.partition_id if device else node

    def _report(self, server_round: int, node: int) -> ClientReport:
        device = self.devices.get(node)
        return ClientReport(
            server_round,
            node,
            self._bytes_down.get(node, 0),
            partition_id=device.partition_id if device else None,
            tier=device.tier if device else "",
            expert_budget=device.expert_budget if device else None,
            requested_experts=self._requested.get(node),
        )

    @staticmethod
    def _fail(report: ClientReport, failure: str, error: str) -> None:
        report.status, report.failure, report.error = "failed", failure, error
        log.warning(
            "round %d: node %d failed (%s): %s", report.round, report.node_id, failure, error
        )

    # No client-side evaluation: the global model is evaluated centrally on the test split.
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None
