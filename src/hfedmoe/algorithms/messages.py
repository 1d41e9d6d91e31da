"""What the server and a client exchange, in the algorithms' own terms (no engine types).

The Flower apps (``hfedmoe.federation``) pack a :class:`TrainRequest` into the server's train
message and unpack the client's reply into a :class:`ClientUpdate`; an algorithm never sees a
message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hfedmoe.foundation.config import DeviceTier

Weights = dict[str, torch.Tensor]
Scalar = int | float | str | list[int]

#: Request config key: C_budget(c), the experts the client is asked to train per batch. A
#: request without it asks for every expert (budget-unaware algorithms).
BUDGET = "expert-budget"


@dataclass
class TrainRequest:
    """What the server asks of one client in one round: the weights it downloads and the
    algorithm's instructions (``config``)."""

    weights: Weights
    config: dict[str, Scalar] = field(default_factory=dict)
    #: the client node's own tensors kept between its rounds (e.g. a personal router); the
    #: client app restores it before ``train_client`` and stores what it holds afterwards
    memory: Weights = field(default_factory=dict)
    #: the client's device (set by the client app; None = unlimited), for algorithms that size
    #: their work to the device's memory on the client (FLUX's merged experts)
    device: DeviceTier | None = None

    def requested_experts(self, pool: int) -> int:
        """How many experts per batch this request asks for, out of a ``pool`` of L x E."""
        return int(self.config.get(BUDGET, pool))  # type: ignore[arg-type]


@dataclass
class ClientUpdate:
    """What a client sends back after local training."""

    weights: Weights
    num_examples: int  # |D_c|
    metrics: dict[str, float] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # algorithm-specific
