"""FedMoE (Mei et al., arXiv 2408.11304, 2024): a sub-MoE per client from its activation pattern,
steered by the server's recommendation of globally useful experts; modular aggregation.

As METHOD.md §9 describes it, with these decisions where the paper is vague:

* a client's activation pattern is its last reported usage u_c(e) (the mean router probability
  of eq. (16)); the server's recommendation is the |D_c|-weighted mean of every client's latest
  usage; the sub-MoE is the top C_budget(c) experts by
  (1 - RECOMMENDATION) u_c(e) + RECOMMENDATION u_global(e), at least one per layer. Before a
  client has reported, its pattern is the recommendation; before anyone has, a seeded draw;
* the client holds only its sub-MoE (strict routing: it downloads, routes among, trains and
  uploads only those experts), which is what a sub-model means;
* modular aggregation: an expert nobody trained is unchanged, one client's is taken, several
  are averaged by |D_c|; row e of each router is averaged over the clients that held expert e
  (|D_c|-weighted), a row nobody held is unchanged; shared parameters: FedAvg by |D_c|.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from hfedmoe.algorithms.base import Aggregation, FederatedAlgorithm, register
from hfedmoe.algorithms.mechanics.assignment import (
    ASSIGNED,
    STRICT,
    assigned_mask,
    held_experts,
    mask_of,
)
from hfedmoe.algorithms.mechanics.hooks import AssignedExperts
from hfedmoe.algorithms.mechanics.layout import ExpertLayout
from hfedmoe.algorithms.mechanics.transfer import download, load_held, upload_weights
from hfedmoe.algorithms.mechanics.uploads import HELD, USAGE, PartialUploads
from hfedmoe.algorithms.messages import BUDGET, ClientUpdate, TrainRequest, Weights
from hfedmoe.data.tokenized import TokenizedDataset
from hfedmoe.foundation.seeding import STRICT_HELD, rng_for
from hfedmoe.model.experts import ExpertModel
from hfedmoe.training import train_local

#: Weight of the server's recommendation against the client's own activation pattern.
RECOMMENDATION = 0.5


class _Modular(Aggregation):
    """Experts by |D_c| over the clients that trained them; router row e by |D_c| over the
    clients that held expert e (a router without one row per expert: by |D_c|); the rest by
    |D_c|."""

    def __init__(self, algorithm: FedMoE, global_weights: Weights):
        self.algorithm = algorithm
        self.merge = algorithm.merge(global_weights, algorithm.layout)
        self.usage: dict[int, torch.Tensor] = {}
        self.examples: dict[int, int] = {}

    def add(self, client: int, update: ClientUpdate) -> None:
        layout, n = self.merge.layout, update.num_examples
        self.merge.add_experts(update, n * (update.stats["expert_updates"] > 0))
        held_LE = update.stats["held"].bool()
        for layer, names in layout.routers.items():
            for name in names:
                x = update.weights[name]
                if x.shape[:1] == (layout.shape[1],):  # one row per expert
                    self.merge.add_rows(name, x, (n * held_LE[layer]).tolist())
                else:
                    self.merge.add(name, x, n)
        self.merge.add_shared(update)
        self.usage[client], self.examples[client] = update.stats["usage"], n

    def finish(self) -> Weights:
        return self.merge.finish()

    def commit(self) -> None:
        self.algorithm.usage.update(self.usage)
        self.algorithm.examples.update(self.examples)


@register
class FedMoE(PartialUploads, FederatedAlgorithm):
    name = "fedmoe"
    NOT_PRIVATE = "its server recommends sub-MoEs from the expert usage clients report"
    STATS: ClassVar = {"usage": USAGE, "held": HELD}  # what aggregate() reads from each reply

    def bind(self, model: nn.Module) -> None:
        self.layout = ExpertLayout.of(model)
        self.usage: dict[int, torch.Tensor] = {}  # client -> its last reported u_c, (L, E)
        self.examples: dict[int, int] = {}  # client -> |D_c|

    def recommendation(self) -> torch.Tensor | None:
        """u_global: the |D_c|-weighted mean of every client's latest usage."""
        if not self.usage:
            return None
        nodes = sorted(self.usage)
        w = torch.tensor([self.examples[n] for n in nodes], dtype=torch.float64)
        u = torch.stack([self.usage[n].to(torch.float64) for n in nodes])
        return (u * (w / w.sum()).view(-1, 1, 1)).sum(0)

    def sub_moe(self, server_round: int, client: int, budget: int) -> torch.Tensor:
        rec = self.recommendation()
        if rec is None:
            rng = rng_for(self.cfg.seed, STRICT_HELD, server_round, client)
            score = torch.from_numpy(rng.random(self.layout.shape))
        else:
            own = self.usage.get(client, rec)
            score = (1 - RECOMMENDATION) * own + RECOMMENDATION * rec
        return held_experts(score, budget)

    def configure_client(
        self, server_round: int, global_weights: Weights, client: int
    ) -> TrainRequest:
        L, E = self.layout.shape
        budget = self.budgets.get(client, L * E)
        held = self.sub_moe(server_round, client, budget)
        config = {BUDGET: budget, ASSIGNED: assigned_mask(held), STRICT: 1}
        return TrainRequest(download(self.layout, global_weights, held), config)

    def aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        return _Modular(self, global_weights)

    def train_client(
        self,
        model: nn.Module,
        data: TokenizedDataset,
        request: TrainRequest,
        rng: np.random.Generator,
    ) -> ClientUpdate:
        em = ExpertModel(model)
        held = mask_of(request, em.shape)
        load_held(model, request.weights, em.expert_entries(), held)
        hooks = AssignedExperts(held)
        with em.restrict_routing(held):
            result = train_local(model, data, self.cfg.train, rng, hooks)
        weights = upload_weights(model, result.expert_updates > 0, em.expert_entries())
        update = self._update(model, data, result, weights)
        update.stats["usage"] = hooks.usage.value()
        update.stats["held"] = held.to(torch.uint8)
        return update

    def state_dict(self) -> dict:
        return {"usage": dict(self.usage), "examples": dict(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.usage = {int(k): v for k, v in state.get("usage", {}).items()}
        self.examples = {int(k): int(v) for k, v in state.get("examples", {}).items()}
