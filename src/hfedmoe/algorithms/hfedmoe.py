"""HFedMoE (Fang et al., arXiv 2601.00583, 2026): budget-aware expert selection and
sparsity-aware aggregation. METHOD.md is the specification; equations carry its numbers.

Client, per batch (backward-only mode, the paper's): the forward pass routes normally; from the
router probabilities of the batch it scores every expert, eq. (3)-(5), (10)-(11), (14), and
updates only E_active, the top-C_budget experts of E_union by I_b, eq. (15); the others pass
gradients on but are not updated (``ExpertModel.update_only``, ``MaskedAdamW``). Per round it
reports u_c(e), eq. (16), s_c(e) (its importance averaged over batches), the per-expert update
counts and |D_c|.

Server: experts by eq. (17) among the clients that used AND updated them (METHOD.md §7), an
expert nobody qualifies for keeps its value; each layer's router by eqs. (19)-(21) with
normalised alphas; shared parameters by FedAvg over |D_c|.

C_budget(c) comes from the client's device (``hfedmoe.budget``); the server learns it before
round 1 and sends it with every task.

Communication. Backward-only: a client downloads all weights and uploads the shared parameters,
the routers and only the experts the server can use (those it updated, or with
``expert_used = "usage"`` also those it used), each expert's tensors under its own key.
Strict (``mode = "strict"``, beyond the paper, METHOD.md §7): the server gives each client a held
set of C_budget experts, at least one per layer: the top ones by the client's last reported
s_c(e) (by the mean s_c over all reports before it has one, by a seeded draw before anyone has
reported). The client downloads the shared parameters, the routers and its held experts, routes
tokens only among them (``ExpertModel.restrict_routing``) and uploads as in backward-only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from hfedmoe.algorithms.aggregation import weighted_average
from hfedmoe.algorithms.base import (
    BUDGET,
    ClientTask,
    ClientUpdate,
    FederatedAlgorithm,
    Weights,
    register,
)
from hfedmoe.algorithms.importance import batch_importance, ib_score, select_active
from hfedmoe.algorithms.sparse_aggregation import (
    combine,
    expert_weights,
    qualifies,
    router_weights,
    routing_consistency,
    usage,
)
from hfedmoe.config import HFedMoEConfig
from hfedmoe.data.tokenized import TokenizedDataset
from hfedmoe.model.experts import ExpertEntry, ExpertId, ExpertModel, RoutingCapture
from hfedmoe.model.state import load_shared_state
from hfedmoe.seeding import STRICT_HELD, rng_for
from hfedmoe.training import StepHooks, train_local

HELD = "held-experts"  # task config key, strict mode: flat indices layer * E + e of held experts


def expert_key(entry: ExpertEntry, expert: ExpertId) -> str:
    """The upload key of one expert's part of a state-dict entry."""
    layer, e = expert
    return entry.state_name if entry.dim is None else f"{entry.state_name}@expert{layer}.{e}"


def upload_weights(
    model: nn.Module, send_LE: torch.Tensor, entries: dict[ExpertId, list[ExpertEntry]]
) -> dict[str, torch.Tensor]:
    """What a client uploads: trainable shared and router parameters by name, and the tensors
    of each expert in ``send_LE`` (whole entries or slices of fused ones) by :func:`expert_key`."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expert_names = {x.state_name for es in entries.values() for x in es}
    out = {n: p.detach().clone() for n, p in params.items() if n not in expert_names}
    for expert, es in entries.items():
        if send_LE[expert]:
            for x in es:
                out[expert_key(x, expert)] = x.take(params[x.state_name].detach()).clone()
    return out


def held_experts(score_LE: torch.Tensor, budget: int) -> torch.Tensor:
    """Strict mode's held set: the best expert of each layer, then the best of the rest, by
    ``score_LE``, ``budget`` in all (at least one per layer, so every layer can route). (L, E)."""
    L, E = score_LE.shape
    if budget < L:
        raise ValueError(f"strict mode needs a budget of at least one expert per layer ({L})")
    held = torch.zeros(L, E, dtype=torch.bool)
    held[torch.arange(L), score_LE.argmax(1)] = True
    rest = select_active(score_LE, ~held, budget - L, "global")
    return held | rest


class ImportanceSelector(StepHooks):
    """The client side of one round: selects E_active per batch, accumulates u_c and s_c."""

    def __init__(self, params: HFedMoEConfig, budget: int):
        self.params, self.budget = params, budget
        self.gate_sum: torch.Tensor | None = None  # sum over samples of G_e(x), (L, E)
        self.importance_sum: torch.Tensor | None = None  # sum over batches of s_b(e), (L, E)
        self.samples = self.batches = 0

    def select_experts(
        self, capture: RoutingCapture, batch: dict[str, torch.Tensor], routed_LE: torch.Tensor
    ) -> torch.Tensor:
        p = self.params
        G_LBE = capture.sample_probs(batch.get("attention_mask"))
        s_b = batch_importance(G_LBE, p.lam)  # eq. (5)
        score = ib_score(G_LBE, p.lam, p.beta) if p.ranking == "ib" else s_b  # eq. (14)
        gate_sum = G_LBE.sum(1)
        self.gate_sum = gate_sum if self.gate_sum is None else self.gate_sum + gate_sum
        self.importance_sum = s_b if self.importance_sum is None else self.importance_sum + s_b
        self.samples += G_LBE.shape[1]
        self.batches += 1
        return select_active(score, routed_LE, self.budget, p.budget_scope)  # eq. (15)


@register
class HFedMoE(FederatedAlgorithm):
    name = "hfedmoe"

    def bind(self, model: nn.Module) -> None:
        em = ExpertModel(model)
        self.shape = em.shape
        self.experts: dict[ExpertId, list[ExpertEntry]] = em.expert_entries()
        self.routers: dict[int, list[str]] = em.router_entries()
        self.consistency = torch.zeros(0)
        self.importance: dict[int, torch.Tensor] = {}  # node -> its last reported s_c, (L, E)

    # ---- server ------------------------------------------------------------------------
    def configure_client(
        self, server_round: int, global_weights: Weights, client: int
    ) -> ClientTask:
        L, E = self.shape
        budget = self.budgets.get(client, L * E)
        if self.cfg.hfedmoe.mode == "backward-only":
            return ClientTask(global_weights, {BUDGET: budget})
        held = held_experts(self._held_score(server_round, client), budget)
        expert_names = {x.state_name for es in self.experts.values() for x in es}
        weights = {n: t for n, t in global_weights.items() if n not in expert_names}
        for expert, entries in self.experts.items():
            if held[expert]:
                for x in entries:
                    weights[expert_key(x, expert)] = x.take(global_weights[x.state_name])
        flat = held.flatten().nonzero().flatten().tolist()
        return ClientTask(weights, {BUDGET: budget, HELD: flat})

    def _held_score(self, server_round: int, client: int) -> torch.Tensor:
        if client in self.importance:
            return self.importance[client]
        if self.importance:
            return torch.stack(list(self.importance.values())).mean(0)
        rng = rng_for(self.cfg.seed, STRICT_HELD, server_round, client)
        return torch.from_numpy(rng.random(self.shape))

    def aggregate(
        self, server_round: int, global_weights: Weights, updates: Mapping[int, ClientUpdate]
    ) -> Weights:
        p = self.cfg.hfedmoe
        clients = sorted(updates)  # a fixed order: sums do not depend on reply order
        ups = [updates[c] for c in clients]
        n_C = torch.tensor([u.num_examples for u in ups])
        u_CLE = torch.stack([u.stats["usage"] for u in ups])
        s_CLE = torch.stack([u.stats["importance"] for u in ups])
        counts = torch.stack([u.stats["expert_updates"] for u in ups])
        new = dict(global_weights)

        # experts, eq. (17)
        used = qualifies(u_CLE, p.tau, counts if p.expert_used == "usage_and_updated" else None)
        w_CLE = expert_weights(n_C, used)
        for (layer, e), entries in self.experts.items():
            w_C = w_CLE[:, layer, e]
            holders = torch.nonzero(w_C).flatten().tolist()  # they uploaded this expert
            if not holders:
                continue  # nobody qualifies: keep the previous global expert
            for entry in entries:
                parts = [ups[c].weights[expert_key(entry, (layer, e))] for c in holders]
                merged = combine(parts, w_C[holders])
                new[entry.state_name] = entry.put(new[entry.state_name], merged)

        # routers, eqs. (19)-(21), per MoE layer
        alpha_CL = router_weights(u_CLE, s_CLE, p.tau, normalize=p.router_alpha == "normalized")
        for layer, names in self.routers.items():
            if alpha_CL[:, layer].sum() == 0:
                continue  # no client has a dominant expert here: keep the previous router
            for name in names:
                new[name] = combine([u.weights[name] for u in ups], alpha_CL[:, layer])

        # shared parameters: FedAvg by |D_c|
        special = {x.state_name for es in self.experts.values() for x in es}
        special |= {n for names in self.routers.values() for n in names}
        for name in global_weights:
            if name not in special and all(name in u.weights for u in ups):
                new[name] = weighted_average([u.weights[name] for u in ups], n_C.tolist())
        self.consistency = routing_consistency(u_CLE >= p.tau)  # eq. (18), reported only
        self.importance.update(zip(clients, s_CLE, strict=True))
        return new

    def round_metrics(self) -> dict[str, float]:
        if not len(self.consistency):
            return {}
        return {"routing_consistency_mean": float(self.consistency.mean())}

    def state_dict(self) -> dict:
        return {"importance": {c: s.clone() for c, s in self.importance.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.importance = {int(c): s.clone() for c, s in state.get("importance", {}).items()}

    # ---- client ------------------------------------------------------------------------
    def train_client(
        self, model: nn.Module, data: TokenizedDataset, task: ClientTask, rng: np.random.Generator
    ) -> ClientUpdate:
        em = ExpertModel(model)
        budget = task.requested_experts(em.num_layers * em.num_experts)
        selector = ImportanceSelector(self.cfg.hfedmoe, budget)
        if HELD not in task.config:  # backward-only: all weights down
            load_shared_state(model, task.weights)
            result = train_local(model, data, self.cfg.train, rng, selector)
        else:
            held = torch.zeros(em.shape, dtype=torch.bool)
            held.view(-1)[torch.tensor(task.config[HELD], dtype=torch.long)] = True
            load_held(model, task.weights, em.expert_entries(), held)
            with em.restrict_routing(held):
                result = train_local(model, data, self.cfg.train, rng, selector)
        u_LE = usage(selector.gate_sum, selector.samples)  # eq. (16)
        send = result.expert_updates > 0
        if self.cfg.hfedmoe.expert_used == "usage":
            send |= (u_LE >= self.cfg.hfedmoe.tau) & result.routed
        weights = upload_weights(model, send, em.expert_entries())
        update = self._update(model, data, result, weights)
        update.stats["usage"] = u_LE
        update.stats["importance"] = selector.importance_sum / max(selector.batches, 1)  # s_c
        update.metrics["expert_budget"] = float(budget)
        update.metrics["experts_used"] = float((u_LE >= self.cfg.hfedmoe.tau).sum())
        return update


def load_held(
    model: nn.Module,
    weights: Weights,
    entries: dict[ExpertId, list[ExpertEntry]],
    held_LE: torch.Tensor,
) -> None:
    """Strict mode's download: the shared parameters and routers by name, each held expert by
    :func:`expert_key` (into its slice where experts are fused)."""
    expert_names = {x.state_name for es in entries.values() for x in es}
    expert_keys = {expert_key(x, ex) for ex, es in entries.items() for x in es}
    shared = {n: t for n, t in weights.items() if n not in expert_keys}
    load_shared_state(model, shared, allow_missing=expert_names)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for expert, es in entries.items():
            if held_LE[expert]:
                for x in es:
                    p = params[x.state_name]
                    p.copy_(x.put(p.detach(), weights[expert_key(x, expert)]))
