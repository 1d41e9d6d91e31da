"""FedAvgM (Hsu et al., 2019): FedAvg with server momentum, as a plugin algorithm.

The server averages the clients' weights as FedAvg does, then moves the global model along a
momentum of those averaged steps: v <- beta v + (w - avg), w <- w - v. Select it with
``plugins = ["examples.extending.fedavgm"]`` and ``algorithm = "fedavgm"``; its own section
sets beta (validated like any other, ``--set fedavgm.beta=0.5`` too):

    [fedavgm]
    beta = 0.9
"""

from __future__ import annotations

from pydantic import Field

from hfedmoe.algorithms import Aggregation, ClientUpdate, FederatedAlgorithm, Weights, register
from hfedmoe.algorithms.mechanics.merging import Merge
from hfedmoe.foundation.config import Section


class FedAvgMConfig(Section):
    """``[fedavgm]``: the server's momentum."""

    beta: float = Field(0.9, ge=0, lt=1, description="beta: how much of the last step carries on.")


class _AverageWithMomentum(Aggregation):
    def __init__(self, velocity: Weights, merge: Merge, beta: float):
        self.velocity = velocity  # the algorithm's, updated in place by commit()
        self.merge = merge  # FedAvg's running weighted sum, under the config's defences
        self.beta = beta

    def add(self, client: int, update: ClientUpdate) -> None:
        for name, x in update.weights.items():
            self.merge.add(name, x, update.num_examples)

    def finish(self) -> Weights:
        averaged = self.merge.finish()
        self.next_velocity: Weights = {}
        out = {}
        for name, w in self.merge.global_weights.items():
            step = w - averaged[name]  # the clients' mean step, as a descent direction
            v = self.velocity.get(name)
            self.next_velocity[name] = step if v is None else self.beta * v + step
            out[name] = w - self.next_velocity[name]
        return out

    def commit(self) -> None:  # the server accepted the round: the momentum moves on
        self.velocity.update(self.next_velocity)


@register
class FedAvgM(FederatedAlgorithm):
    name = "fedavgm"
    SECTION = "fedavgm"
    OPTIONS = FedAvgMConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.velocity: Weights = {}  # the server's momentum, per weight

    def aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        beta = self.options().beta
        return _AverageWithMomentum(self.velocity, self.merge(global_weights), beta)

    def state_dict(self) -> dict:  # saved in checkpoints, so a resumed run continues alike
        return {"velocity": dict(self.velocity)}

    def load_state_dict(self, state: dict) -> None:
        self.velocity = dict(state.get("velocity", {}))
