"""HFedMoE (Fang et al., arXiv 2601.00583, 2026): budget-aware expert selection and
sparsity-aware aggregation. METHOD.md is the specification; equations carry its numbers.

Client, per batch (backward-only mode, the paper's): the forward pass routes normally; from the
router probabilities of the batch it scores every expert, eq. (3)-(5), (10)-(11), (14), and
updates only E_active, the top-C_budget experts of E_union by I_b, eq. (15); the others pass
gradients on but are not updated (``ExpertModel.update_only``, ``ExpertAdamW``). Per round it
reports u_c(e), eq. (16), s_c(e) (its importance averaged over batches), the per-expert update
counts and |D_c|. u_c(e) is, by default, the mean gate over all of D_c after local training in
eval mode (one extra forward pass, timed as ``usage_seconds``; METHOD.md §7); with
``usage_over = "batches"``, over the batches drawn while training.

Server: experts by eq. (17) among the clients that used AND updated them (METHOD.md §7), an
expert nobody qualifies for keeps its value; each layer's router by eqs. (19)-(21) with
normalised alphas, S_c and S_global taken within that layer (``router_alpha_scope``; METHOD.md
§7's other reading: one alpha(c) per client over all layers); shared parameters by FedAvg over
|D_c|.

C_budget(c) comes from the client's device (``hfedmoe.budget``); the server learns it before
round 1 and sends it with every request.

Communication. Backward-only: a client downloads all weights and uploads the shared parameters,
the routers and only the experts the server can use (those it updated, or with
``expert_used = "usage"`` also those it used and routed to; the server counts a client for an
expert only if it sent it), each expert's tensors under its own key.
Strict (``mode = "strict"``, beyond the paper, METHOD.md §7): the server gives each client a held
set of C_budget experts, at least one per layer: the top ones by the client's last reported
s_c(e) (by the mean s_c over all reports before it has one, by a seeded draw before anyone has
reported). The client downloads the shared parameters, the routers and its held experts, routes
tokens only among them (``ExpertModel.restrict_routing``) and uploads as in backward-only.
"""

from __future__ import annotations

import contextlib
import time
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from hfedmoe.algorithms.base import Aggregation, FederatedAlgorithm, register
from hfedmoe.algorithms.maths.diagnostics import excluded_updates, usage_overlap, weight_distance
from hfedmoe.algorithms.maths.importance import batch_importance, ib_score, select_active
from hfedmoe.algorithms.maths.sparse_aggregation import (
    dominant,
    global_dominant,
    qualifies,
    router_mass,
    routing_consistency,
)
from hfedmoe.algorithms.mechanics.assignment import (
    ASSIGNED,
    STRICT,
    assigned_mask,
    held_experts,
    mask_of,
    own_or_mean,
)
from hfedmoe.algorithms.mechanics.hooks import GateUsage, usage_over_data
from hfedmoe.algorithms.mechanics.layout import ExpertLayout, uploaded_mask
from hfedmoe.algorithms.mechanics.transfer import download, load_held, upload_weights
from hfedmoe.algorithms.mechanics.uploads import (
    EXPERTS,
    IMPORTANCE,
    USAGE,
    PartialUploads,
    Range,
)
from hfedmoe.algorithms.messages import BUDGET, ClientUpdate, TrainRequest, Weights
from hfedmoe.data.tokenized import TokenizedDataset, padded_tokens
from hfedmoe.foundation.config import ExperimentConfig, HFedMoEConfig
from hfedmoe.foundation.seeding import STRICT_HELD, rng_for
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.routing import RoutingCapture
from hfedmoe.model.state import load_shared_state
from hfedmoe.training import StepHooks, train_local


class ImportanceSelector(StepHooks):
    """The client side of one round: selects E_active per batch, accumulates u_c and s_c."""

    def __init__(self, params: HFedMoEConfig, budget: int):
        self.params, self.budget = params, budget
        self.usage = GateUsage()  # u_c(e), eq. (16)
        self.importance_sum: torch.Tensor | None = None  # sum over batches of s_b(e), (L, E)
        self.batches = 0

    def select_experts(
        self, capture: RoutingCapture, batch: dict[str, torch.Tensor], routed_LE: torch.Tensor
    ) -> torch.Tensor:
        p = self.params
        G_LBE = capture.sample_probs(batch.get("attention_mask"))
        s_b = batch_importance(G_LBE, p.lam)  # eq. (5)
        score = ib_score(G_LBE, p.lam, p.beta) if p.ranking == "ib" else s_b  # eq. (14)
        self.usage.add(G_LBE)
        self.importance_sum = s_b if self.importance_sum is None else self.importance_sum + s_b
        self.batches += 1
        return select_active(score, routed_LE, self.budget, p.budget_scope)  # eq. (15)


class SparsityAwareAggregation(Aggregation):
    """The server side of one round, METHOD.md §4, folded one client at a time.

    Each weight is a mass of client c alone over the sum of the masses (``mechanics.merging``):
    an expert's, eq. (17), is |D_c| 1[c qualifies]; a layer's router's, eqs. (19)-(21), is
    sum_{e in S_c} u_c(e) s_c(e) (eq. (20)'s alpha up to |S_global|, which normalising
    cancels; without normalisation the sum is divided by |S_global| at the end); the shared
    parameters' is |D_c|.
    """

    def __init__(self, algorithm: HFedMoE, global_weights: Weights):
        self.algorithm, self.p = algorithm, algorithm.cfg.hfedmoe
        self.merge = algorithm.merge(global_weights, algorithm.layout)
        self.dominant: dict[int, torch.Tensor] = {}  # client -> S_c, (L, E) bool
        self.importance: dict[int, torch.Tensor] = {}  # client -> s_c, (L, E)
        # the "why" of METHOD.md §4, measured (maths.diagnostics): expert updates eq. (17)
        # leaves out against all of them; each client's router mass and |D_c|
        self.excluded, self.updates = 0, 0
        self.router_mass: dict[int, torch.Tensor] = {}  # client -> (L,)
        self.examples: dict[int, int] = {}

    def add(self, client: int, update: ClientUpdate) -> None:
        p, layout, n = self.p, self.merge.layout, update.num_examples
        u_LE, s_LE = update.stats["usage"], update.stats["importance"]
        counts_LE = update.stats["expert_updates"]

        # experts, eq. (17); the holder-averaging ablation: every client that updated them
        if p.expert_aggregation == "holders":
            counts = counts_LE > 0
        else:
            # "usage": an expert a client used (u >= tau, eq. (16) counts every gate value) but
            # never routed to was not trained, so it was not uploaded and cannot count.
            if p.expert_used == "usage_and_updated":
                updated = counts_LE
            else:
                updated = uploaded_mask(layout, update.weights)
            counts = qualifies(u_LE, p.tau, updated)
            excluded, updates = excluded_updates(counts, counts_LE)
            self.excluded, self.updates = self.excluded + excluded, self.updates + updates
        self.merge.add_experts(update, n * counts)
        mass_L = router_mass(u_LE, s_LE, p.tau, p.router_alpha_scope)
        self.router_mass[client] = mass_L
        self.examples[client] = n

        # routers, eqs. (19)-(21), each layer's with alpha(c) of its scope (per layer, or one
        # over all layers); the FedAvg ablation: by |D_c|
        if p.router_aggregation == "eq21":
            for layer, names in layout.routers.items():
                for name in names:  # a layer where nobody has a dominant expert keeps its router
                    self.merge.add(name, update.weights[name], float(mass_L[layer]), examples=n)
            self.merge.add_shared(update)
        else:
            self.merge.add_shared(update, also=layout.router_names)
        self.dominant[client] = dominant(u_LE, p.tau)
        self.importance[client] = s_LE

    def finish(self) -> Weights:
        S_CLE = torch.stack([self.dominant[c] for c in sorted(self.dominant)])
        divisors = {}
        if self.p.router_aggregation == "eq21" and self.p.router_alpha != "normalized":
            scope = self.p.router_alpha_scope
            n_global_L = global_dominant(S_CLE, scope).tolist()  # eq. (20)'s |S_global|
            layout = self.merge.layout
            divisors = {n: n_global_L[layer] for layer, ns in layout.routers.items() for n in ns}
        self.consistency = routing_consistency(S_CLE)  # eq. (18), reported only
        clients = sorted(self.router_mass)
        mass_CL = torch.stack([self.router_mass[c] for c in clients])
        examples_C = torch.tensor([float(self.examples[c]) for c in clients])
        eq21 = self.p.router_aggregation == "eq21"
        distances = [weight_distance(m, examples_C) if eq21 else 0.0 for m in mass_CL.T]
        self.diagnostics = {
            "eq17_excluded_share": self.excluded / self.updates if self.updates else 0.0,
            "router_weight_tv_mean": float(np.nanmean(distances)) if distances else 0.0,
        }
        return self.merge.finish(divisors)

    def commit(self) -> None:
        self.algorithm.consistency = self.consistency
        self.algorithm.diagnostics = self.diagnostics
        self.algorithm.importance.update(self.importance)


@register
class HFedMoE(PartialUploads, FederatedAlgorithm):
    name = "hfedmoe"
    NOT_PRIVATE = None  # backward-only: the server plans nothing from s_c (see not_private)
    SECTION = "hfedmoe"
    STATS: ClassVar = {"usage": USAGE, "importance": IMPORTANCE}  # what aggregate() reads
    METRICS: ClassVar = {
        "experts_used": Range(0, EXPERTS, integer=True),
        "usage_seconds": Range(),
        "active_usage_overlap": Range(0, 1),
    }
    #: ``[hfedmoe]`` settings this algorithm fixes (the ablations, ``ablations.py``)
    forced: ClassVar[dict[str, object]] = {}

    def __init__(self, cfg: ExperimentConfig):
        if self.forced:
            cfg = cfg.model_copy(update={"hfedmoe": cfg.hfedmoe.model_copy(update=self.forced)})
        super().__init__(cfg)

    @property
    def holds_subset(self) -> bool:
        return self.cfg.hfedmoe.mode == "strict"

    def not_private(self) -> str | None:
        if self.holds_subset:
            return "hfedmoe.mode = 'strict' picks each download from the s_c clients report"
        return None

    def bind(self, model: nn.Module) -> None:
        self.layout = ExpertLayout.of(model)
        self.consistency = torch.zeros(0)
        self.diagnostics: dict[str, float] = {}
        self.importance: dict[int, torch.Tensor] = {}  # client -> its last reported s_c, (L, E)

    # ---- server ------------------------------------------------------------------------
    def configure_client(
        self, server_round: int, global_weights: Weights, client: int
    ) -> TrainRequest:
        L, E = self.layout.shape
        budget = self.budgets.get(client, L * E)
        if not self.holds_subset:
            return TrainRequest(global_weights, {BUDGET: budget})
        held = held_experts(self._held_score(server_round, client), budget)
        config = {BUDGET: budget, ASSIGNED: assigned_mask(held), STRICT: 1}
        return TrainRequest(download(self.layout, global_weights, held), config)

    def _held_score(self, server_round: int, client: int) -> torch.Tensor:
        rng = rng_for(self.cfg.seed, STRICT_HELD, server_round, client)
        return own_or_mean(self.importance, client, rng, self.layout.shape)

    def aggregation(self, server_round: int, global_weights: Weights) -> Aggregation:
        return SparsityAwareAggregation(self, global_weights)

    def round_metrics(self) -> dict[str, float]:
        if not len(self.consistency):
            return {}
        return {"routing_consistency_mean": float(self.consistency.mean()), **self.diagnostics}

    def state_dict(self) -> dict:
        return {"importance": {c: s.clone() for c, s in self.importance.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.importance = {int(c): s.clone() for c, s in state.get("importance", {}).items()}

    # ---- client ------------------------------------------------------------------------
    def train_client(
        self,
        model: nn.Module,
        data: TokenizedDataset,
        request: TrainRequest,
        rng: np.random.Generator,
    ) -> ClientUpdate:
        em = ExpertModel(model)
        budget = request.requested_experts(em.num_layers * em.num_experts)
        selector = ImportanceSelector(self.cfg.hfedmoe, budget)
        held = mask_of(request, em.shape)
        if held is None:  # backward-only: all weights down
            load_shared_state(model, request.weights)
        else:
            load_held(model, request.weights, em.expert_entries(), held)
        routing = contextlib.nullcontext() if held is None else em.restrict_routing(held)
        with routing:
            result = train_local(model, data, self.cfg.train, rng, selector)
            started = time.perf_counter()
            forward_tokens = 0
            if self.cfg.hfedmoe.usage_over == "data":  # eq. (16) over D_c, after training
                u_LE = usage_over_data(model, data, self.cfg.eval.batch_size, self.cfg.train.device)
                forward_tokens = padded_tokens(data, self.cfg.eval.batch_size)
            else:  # over the batches drawn while training
                u_LE = selector.usage.value()
            usage_seconds = time.perf_counter() - started
        send = result.expert_updates > 0
        if self.cfg.hfedmoe.expert_used == "usage":
            send |= (u_LE >= self.cfg.hfedmoe.tau) & result.routed
        weights = upload_weights(model, send, em.expert_entries())
        update = self._update(model, data, result, weights)
        update.stats["usage"] = u_LE
        update.stats["importance"] = selector.importance_sum / max(selector.batches, 1)  # s_c
        update.metrics["experts_used"] = float((u_LE >= self.cfg.hfedmoe.tau).sum())
        update.metrics["usage_seconds"] = usage_seconds
        update.metrics["forward_tokens"] = float(forward_tokens)
        overlap = usage_overlap(u_LE, result.expert_updates)
        if overlap == overlap:  # undefined (NaN) when it updated no expert: not reported
            update.metrics["active_usage_overlap"] = overlap
        return update
