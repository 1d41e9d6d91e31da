"""FedAvg (McMahan et al., AISTATS 2017) over all parameters of the MoE model.

Every sampled client downloads the whole model, trains every parameter that its batches reach,
and uploads them; the server averages each parameter weighted by the clients' example counts
|D_c|. Parameters no client uploaded (none, for FedAvg) keep their global value.
"""

from __future__ import annotations

from collections.abc import Mapping

from hfedmoe.algorithms.base import FederatedAlgorithm, register
from hfedmoe.algorithms.maths.averaging import weighted_average
from hfedmoe.algorithms.messages import ClientUpdate, Weights


@register
class FedAvg(FederatedAlgorithm):
    name = "fedavg"

    def aggregate(
        self, server_round: int, global_weights: Weights, updates: Mapping[int, ClientUpdate]
    ) -> Weights:
        new = dict(global_weights)
        clients = sorted(updates)  # a fixed order: float sums do not depend on reply order
        for key in global_weights:
            holders = [c for c in clients if key in updates[c].weights]
            if holders:
                new[key] = weighted_average(
                    [updates[c].weights[key] for c in holders],
                    [updates[c].num_examples for c in holders],
                )
        return new
