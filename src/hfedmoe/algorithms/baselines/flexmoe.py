"""FLEX-MoE (Zhang et al., arXiv 2512.23070, 2025): the server assigns each client k_c experts by
client-expert fitness, under load-balance bounds; experts averaged by usage; routers stay local.

As METHOD.md §9 describes it, with these decisions where the paper is vague:

* k_c = C_budget(c);
* fitness f_c(e) = u_c(e) * exp(-loss_c) from the client's last participation: its usage of the
  expert (eq. (16)) scaled by how well it trained (its mean local loss); the paper also names
  accuracy, which clients here do not measure locally. A client not seen yet gets the mean
  fitness of the others, and a seeded draw breaks ties before anyone has reported;
* load balance: first every expert gets one holder (the fittest client with room left, experts
  in order of their best fitness), while slots remain; then the remaining slots go to the
  fittest (client, expert) pairs with no expert held by more than
  ceil(sum_c k_c / (L * E)) + 1 clients;
* routing is normal (backward-only): the assigned experts are updated on batches routed to them;
* experts: averaged over the clients that updated them, weighted by their usage u_c(e); one
  nobody updated keeps its value; shared parameters: FedAvg by |D_c|;
* routers are personal: a client keeps its own router between rounds (in its node's memory,
  ``TrainRequest.memory``) and never uploads it; the global router stays as initialised, so the
  global model is evaluated with it (the personalised routers are not part of the global model).
  A client's personal model is the global weights with its own routers
  (:meth:`FlexMoE.personal_weights`); where the server can read the nodes' state, it evaluates
  it on the client's own distribution's test data beside the global model's
  (``personal_model_accuracy``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from hfedmoe.algorithms.base import Aggregation, FederatedAlgorithm, register
from hfedmoe.algorithms.mechanics.assignment import ASSIGNED, assigned_mask, own_or_mean
from hfedmoe.algorithms.mechanics.hooks import AssignedExperts
from hfedmoe.algorithms.mechanics.layout import ExpertLayout
from hfedmoe.algorithms.mechanics.transfer import upload_weights
from hfedmoe.algorithms.mechanics.uploads import USAGE, PartialUploads, UploadSpec, partial_upload
from hfedmoe.algorithms.messages import BUDGET, ClientUpdate, TrainRequest, Weights
from hfedmoe.data.tokenized import TokenizedDataset
from hfedmoe.foundation.seeding import FLEX_ASSIGN, rng_for
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.state import load_shared_state
from hfedmoe.training import train_local

ROUTER_MEMORY = "router/"  # prefix of a client's personal router tensors in its memory


def assign(fitness_CX: torch.Tensor, slots_C: list[int]) -> torch.Tensor:
    """Load-balanced assignment of X experts to C clients by fitness. (C, X) bool.

    Pass 1: each expert, in order of its best fitness, goes to its fittest client with a free
    slot (so every expert is trained while slots last). Pass 2: the remaining slots go to the
    fittest (client, expert) pairs, no expert above ceil(sum slots / X) + 1 holders.
    """
    C, X = fitness_CX.shape
    out = torch.zeros(C, X, dtype=torch.bool)
    free = list(slots_C)
    cap = math.ceil(sum(slots_C) / X) + 1
    for x in torch.argsort(fitness_CX.max(0).values, descending=True, stable=True).tolist():
        for c in torch.argsort(fitness_CX[:, x], descending=True, stable=True).tolist():
            if free[c] > 0:
                out[c, x], free[c] = True, free[c] - 1
                break
    for i in torch.argsort(fitness_CX.flatten(), descending=True, stable=True).tolist():
        c, x = divmod(i, X)
        if free[c] > 0 and not out[c, x] and int(out[:, x].sum()) < cap:
            out[c, x], free[c] = True, free[c] - 1
    return out


class _ByUsage(Aggregation):
    """Experts weighted by u_c(e) over the clients that updated them; the shared parameters by
    |D_c|; routers are not aggregated. Remembers each client's fitness for the next plan."""

    def __init__(self, algorithm: FlexMoE, global_weights: Weights):
        self.algorithm = algorithm
        self.merge = algorithm.merge(global_weights, algorithm.layout)
        self.fitness: dict[int, torch.Tensor] = {}

    def add(self, client: int, update: ClientUpdate) -> None:
        u_LE = update.stats["usage"].double()
        updated_LE = update.stats["expert_updates"] > 0
        self.merge.add_experts(update, torch.where(updated_LE, u_LE, 0.0))  # not capped (merging)
        self.merge.add_shared(update)  # routers stay home
        self.fitness[client] = u_LE * math.exp(-update.metrics["train_loss"])

    def finish(self) -> Weights:
        return self.merge.finish()

    def commit(self) -> None:
        self.algorithm.fitness.update(self.fitness)


@register
class FlexMoE(PartialUploads, FederatedAlgorithm):
    name = "flexmoe"
    NOT_PRIVATE = "its server assigns experts from the usage clients report"
    STATS: ClassVar = {"usage": USAGE}  # what aggregate() reads from each reply

    def bind(self, model: nn.Module) -> None:
        self.layout = ExpertLayout.of(model)
        self.fitness: dict[int, torch.Tensor] = {}  # client -> f_c(e) from its last round, (L, E)
        self._plan: dict[int, torch.Tensor] = {}  # this round's assignment, client -> (L, E)
        self._plan_round = -1

    def plan(self, server_round: int, clients: list[int]) -> dict[int, torch.Tensor]:
        """The round's assignment for ``clients`` (all sampled clients), made once per round."""
        L, E = self.layout.shape
        rng = rng_for(self.cfg.seed, FLEX_ASSIGN, server_round)
        fit = torch.stack(
            [own_or_mean(self.fitness, c, rng, (L, E)).flatten().double() for c in clients]
        )
        slots = [min(self.budgets.get(c, L * E), L * E) for c in clients]
        chosen = assign(fit, slots)
        return {c: chosen[i].view(L, E) for i, c in enumerate(clients)}

    def configure_round(self, server_round: int, clients: list[int]) -> None:
        self._plan = self.plan(server_round, sorted(clients))
        self._plan_round = server_round

    def configure_client(
        self, server_round: int, global_weights: Weights, client: int
    ) -> TrainRequest:
        if self._plan_round != server_round or client not in self._plan:
            self.configure_round(server_round, [client])
        L, E = self.layout.shape
        config = {
            BUDGET: self.budgets.get(client, L * E),
            ASSIGNED: assigned_mask(self._plan[client]),
        }
        return TrainRequest(global_weights, config)

    def aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        return _ByUsage(self, global_weights)

    def train_client(
        self,
        model: nn.Module,
        data: TokenizedDataset,
        request: TrainRequest,
        rng: np.random.Generator,
    ) -> ClientUpdate:
        load_shared_state(model, request.weights)
        em = ExpertModel(model)
        routers = set(ExpertLayout.of(model).router_names)
        params = dict(model.named_parameters())
        with torch.no_grad():  # the client's own router from its last round, if any
            for name in routers:
                if ROUTER_MEMORY + name in request.memory:
                    params[name].copy_(request.memory[ROUTER_MEMORY + name])
        hooks = AssignedExperts.from_request(request, em.shape)
        result = train_local(model, data, self.cfg.train, rng, hooks)
        for name in routers:
            request.memory[ROUTER_MEMORY + name] = params[name].detach().clone()
        weights = upload_weights(model, result.expert_updates > 0, em.expert_entries())
        weights = {n: t for n, t in weights.items() if n not in routers}  # routers stay home
        update = self._update(model, data, result, weights)
        update.stats["usage"] = hooks.usage.value()
        return update

    def personal_weights(self, global_weights: Weights, memory: Weights) -> Weights:
        """The client's own routers, as its node keeps them after its last round, in place of
        the global ones (none kept yet: its model is the global one)."""
        return {
            name: memory[ROUTER_MEMORY + name]
            for name in self.layout.router_names
            if ROUTER_MEMORY + name in memory
            and memory[ROUTER_MEMORY + name].shape == global_weights[name].shape
        }

    def upload_spec(self, model: nn.Module) -> UploadSpec:
        """Routers stay home: a client must not upload them."""
        routers = frozenset(ExpertLayout.of(model).router_names)
        return partial_upload(model, exclude=routers, stats=self.STATS).declare(self.METRICS)

    def state_dict(self) -> dict:
        return {"fitness": dict(self.fitness)}

    def load_state_dict(self, state: dict) -> None:
        self.fitness = {int(k): v for k, v in state.get("fitness", {}).items()}
