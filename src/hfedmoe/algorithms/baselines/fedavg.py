"""FedAvg (McMahan et al., AISTATS 2017) over all parameters of the MoE model.

Every sampled client downloads the whole model, trains every parameter that its batches reach,
and uploads them; the server averages each parameter weighted by the clients' example counts
|D_c|, one reply at a time (``mechanics.merging``). Parameters no client uploaded (none, for
FedAvg) keep their global value.
"""

from __future__ import annotations

from hfedmoe.algorithms.base import Aggregation, FederatedAlgorithm, register
from hfedmoe.algorithms.mechanics.merging import Merge
from hfedmoe.algorithms.messages import ClientUpdate, Weights


class _Average(Aggregation):
    def __init__(self, merge: Merge):
        self.merge = merge

    def add(self, client: int, update: ClientUpdate) -> None:
        for name, x in update.weights.items():
            if name in self.merge.global_weights:
                self.merge.add(name, x, update.num_examples)

    def finish(self) -> Weights:
        return self.merge.finish()


@register
class FedAvg(FederatedAlgorithm):
    name = "fedavg"
    NOT_PRIVATE = None
    DENSE_UPLOADS = True  # every trainable tensor, every round: local DP hides all of it

    def aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        return _Average(self.merge(global_weights))
