"""Federated evaluation (``eval.mode``): clients evaluate the global model on their own
held-out share (``data.client_test_fraction``) and the server combines what they say.

Who evaluates: every client in round 0 and in the last round; in between the round's sampled
clients (``eval.federated_clients = "all"``: every client every round). Each answer is
untrusted input like a train reply: it is checked whole (``wire.unpack_evaluation``), it must
come from the node asked and name that node's client, and its number of examples must be what
``data.client_test_fraction`` holds out of the size the server knows for that client, so no
client can buy weight in the mean. An answer that fails is left out with its reason.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType

from hfedmoe.algorithms import TrainRequest
from hfedmoe.data.partition import held_out_count
from hfedmoe.federation import wire
from hfedmoe.foundation.config import ExperimentConfig

log = logging.getLogger("hfedmoe")


def evaluators(
    cfg: ExperimentConfig, server_round: int, sampled: Iterable[int], everyone: Iterable[int]
) -> list[int]:
    """The clients asked to evaluate after ``server_round`` (0: the initial model)."""
    if server_round in (0, cfg.federation.rounds) or cfg.eval.federated_clients == "all":
        return sorted(everyone)
    return sorted(sampled)


def held_out_sizes(trained: int, fraction: float) -> set[int]:
    """The held-out counts a client that trains on ``trained`` rows can have: those of every
    size N with N - held_out_count(N) = trained (two, where the rounding steps).

    held_out_count(N) is f N rounded, clamped to [1, N - 1], so such an N lies within
    (trained +- 2) / (1 - f): only that window is searched, whatever size a node declares."""
    low = max(trained, math.floor((trained - 2) / (1 - fraction)) - 1)
    high = math.ceil((trained + 2) / (1 - fraction)) + 1
    return {
        held
        for rows in range(low, high + 1)
        if rows - (held := held_out_count(rows, fraction)) == trained
    }


def requests(
    arrays: ArrayRecord, server_round: int, nodes: dict[int, int], clients: list[int]
) -> list[Message]:
    """One evaluate message per client (by its node), sharing the packed global weights."""
    return [
        Message(
            wire.pack_request(TrainRequest({}, {}), server_round, arrays=arrays),
            dst_node_id=nodes[client],
            message_type=MessageType.EVALUATE,
            group_id=f"{server_round}-evaluate",
        )
        for client in clients
    ]


@dataclass
class FederatedEvaluation:
    """What the asked clients said: each accepted evaluation, and why the others were left
    out (by client: error, malformed, client (it named another), examples, no-reply)."""

    asked: list[int]
    accepted: dict[int, wire.ClientEvaluation] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)

    @property
    def examples(self) -> int:
        return sum(e.examples for e in self.accepted.values())

    def mean(self, key: str) -> float | None:
        """The mean of ``key`` (accuracy, loss) over the accepted clients, weighted by their
        examples; None where none was accepted."""
        if self.examples == 0:
            return None
        total = sum(getattr(e, key) * e.examples for e in self.accepted.values())
        return total / self.examples

    def per_client(self, num_clients: int, personal: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Every client's accuracy and loss (C,), NaN where it did not evaluate; ``personal``:
        its personal model's (the global model's where it keeps none yet)."""
        acc_C, loss_C = np.full(num_clients, np.nan), np.full(num_clients, np.nan)
        for client, e in self.accepted.items():
            if e.examples:
                acc_C[client], loss_C[client] = e.accuracy, e.loss
                if personal and e.personal_accuracy is not None:
                    acc_C[client], loss_C[client] = e.personal_accuracy, e.personal_loss
        return acc_C, loss_C

    @property
    def has_personal(self) -> bool:
        """Whether any client evaluated a personal model of its own."""
        return any(e.personal_accuracy is not None for e in self.accepted.values())

    def record(self) -> dict:
        """The round's ``federated_*`` keys."""
        return {
            "federated_accuracy": self.mean("accuracy"),
            "federated_loss": self.mean("loss"),
            "federated_examples": self.examples,
            "federated_clients": [
                {k: v for k, v in asdict(self.accepted[c]).items() if v is not None}
                for c in sorted(self.accepted)
            ],
            "federated_failures": dict(Counter(self.failures.values())),
        }


def read(
    replies: Iterable[Message],
    asked: list[int],
    nodes: dict[int, int],
    trained: dict[int, int],
    fraction: float,
) -> FederatedEvaluation:
    """Check each reply whole and keep the valid ones; ``trained``: the size of each client's
    training rows the server knows (its held-out count follows from it)."""
    result = FederatedEvaluation(asked)
    client_of = {nodes[c]: c for c in asked}
    for reply in replies:
        client = client_of.get(reply.metadata.src_node_id)
        if client is None or client in result.accepted or client in result.failures:
            continue  # not asked, or answered already
        if reply.has_error():
            result.failures[client] = "error"
            log.warning("client %d: evaluation failed: %s", client, reply.error.reason)
            continue
        try:
            evaluation = wire.unpack_evaluation(reply.content)
        except Exception as exc:  # untrusted: whatever it holds, the answer is left out
            result.failures[client] = "malformed"
            log.warning(
                "client %d: %s", client, exc if isinstance(exc, ValueError) else "malformed"
            )
            continue
        if evaluation.partition_id != client:
            result.failures[client] = "client"  # it names another client
        elif evaluation.examples not in held_out_sizes(trained[client], fraction):
            result.failures[client] = "examples"  # not the share the server knows it holds
        else:
            result.accepted[client] = evaluation
    for client in asked:
        if client not in result.accepted and client not in result.failures:
            result.failures[client] = "no-reply"
    return result
