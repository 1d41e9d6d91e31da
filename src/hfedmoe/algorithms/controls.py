"""Controls: runs that measure a setting rather than compete in it, beside the methods.

* ``frozen-experts``: every client trains everything but the experts (routers, attention,
  norms, embeddings, the head) and the experts keep their initial values. Its accuracy is what
  training the rest of the model gives on its own, so its distance to the budget-aware methods
  is the most that training experts, and so any rule for choosing which to train (HFedMoE's,
  FedMoE's, FLEX-MoE's, FLUX's or a random draw), has added in that setting. It is Random
  subset with no expert drawn: the same client, aggregation (routers and shared parameters by
  |D_c|) and uploads (no expert goes up).
"""

from __future__ import annotations

import torch

from hfedmoe.algorithms.base import register
from hfedmoe.algorithms.baselines.random_subset import RandomSubset
from hfedmoe.algorithms.mechanics.assignment import ASSIGNED, assigned_mask
from hfedmoe.algorithms.messages import BUDGET, TrainRequest, Weights


@register
class FrozenExperts(RandomSubset):
    name = "frozen-experts"

    def configure_client(
        self, server_round: int, global_weights: Weights, client: int
    ) -> TrainRequest:
        none_LE = torch.zeros(self.layout.shape, dtype=torch.bool)
        return TrainRequest(global_weights, {BUDGET: 0, ASSIGNED: assigned_mask(none_LE)})
