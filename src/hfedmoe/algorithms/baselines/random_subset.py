"""Random subset (METHOD.md §9): each client trains C_budget(c) experts drawn at random.

The budget-aware baseline with no intelligence in the choice: it shows what HFedMoE's
importance-based selection and sparsity-aware aggregation add over respecting the budget alone.

Decisions where METHOD.md is brief:

* the draw is uniform over all (layer, expert) pairs, a fresh one for every client and round,
  seeded by (seed, round, client): C_budget(c) experts, so the client never exceeds its device;
* routing is normal (backward-only, like HFedMoE's default): the drawn experts are updated on
  the batches routed to them, the others pass gradients on but do not move;
* an expert is averaged over the clients that updated it, weighted by |D_c|; one nobody
  updated keeps its value; routers and shared parameters: FedAvg by |D_c|.

Communication as HFedMoE's backward-only mode: everything down; shared parameters, routers and
the updated experts up.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hfedmoe.algorithms.base import Aggregation, FederatedAlgorithm, register
from hfedmoe.algorithms.mechanics.assignment import ASSIGNED, assigned_mask
from hfedmoe.algorithms.mechanics.hooks import AssignedExperts
from hfedmoe.algorithms.mechanics.layout import ExpertLayout
from hfedmoe.algorithms.mechanics.merging import Merge
from hfedmoe.algorithms.mechanics.transfer import upload_weights
from hfedmoe.algorithms.mechanics.uploads import PartialUploads
from hfedmoe.algorithms.messages import BUDGET, ClientUpdate, TrainRequest, Weights
from hfedmoe.data.tokenized import TokenizedDataset
from hfedmoe.foundation.seeding import RANDOM_SUBSET, rng_for
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.state import load_shared_state
from hfedmoe.training import train_local


def draw_experts(shape: tuple[int, int], budget: int, rng: np.random.Generator) -> torch.Tensor:
    """``budget`` (layer, expert) pairs drawn uniformly without replacement. (L, E) bool."""
    L, E = shape
    chosen = torch.zeros(L * E, dtype=torch.bool)
    chosen[torch.from_numpy(rng.choice(L * E, size=min(budget, L * E), replace=False))] = True
    return chosen.view(L, E)


class _ByUpdaters(Aggregation):
    """Each expert by |D_c| over the clients that updated it; routers and the rest by |D_c|."""

    def __init__(self, merge: Merge):
        self.merge = merge

    def add(self, client: int, update: ClientUpdate) -> None:
        self.merge.add_experts(update, update.num_examples * (update.stats["expert_updates"] > 0))
        self.merge.add_shared(update, also=self.merge.layout.router_names)

    def finish(self) -> Weights:
        return self.merge.finish()


@register
class RandomSubset(PartialUploads, FederatedAlgorithm):
    name = "random"
    NOT_PRIVATE = None  # its draws use the seed and the budgets, never what clients report

    def bind(self, model: nn.Module) -> None:
        self.layout = ExpertLayout.of(model)

    def configure_client(
        self, server_round: int, global_weights: Weights, client: int
    ) -> TrainRequest:
        L, E = self.layout.shape
        budget = self.budgets.get(client, L * E)
        rng = rng_for(self.cfg.seed, RANDOM_SUBSET, server_round, client)
        drawn = draw_experts(self.layout.shape, budget, rng)
        return TrainRequest(global_weights, {BUDGET: budget, ASSIGNED: assigned_mask(drawn)})

    def aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        return _ByUpdaters(self.merge(global_weights, self.layout))

    def train_client(
        self,
        model: nn.Module,
        data: TokenizedDataset,
        request: TrainRequest,
        rng: np.random.Generator,
    ) -> ClientUpdate:
        load_shared_state(model, request.weights)
        em = ExpertModel(model)
        hooks = AssignedExperts.from_request(request, em.shape)
        result = train_local(model, data, self.cfg.train, rng, hooks)
        weights = upload_weights(model, result.expert_updates > 0, em.expert_entries())
        return self._update(model, data, result, weights)
