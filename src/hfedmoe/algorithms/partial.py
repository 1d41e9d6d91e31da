"""Partial participation in the expert pool, shared by the budget-aware algorithms.

Which experts a client is assigned, what it downloads and uploads, and how experts that only
some clients trained are merged. HFedMoE and the baselines differ in *which* experts and *with
which weights*; the mechanics are here, once.

Task config keys (set by the server, read by the client):

* ``ASSIGNED``: flat indices ``layer * E + e`` of the experts the client may train this round;
  absent = the client chooses per batch (HFedMoE's backward-only mode);
* ``STRICT``: 1 = the client holds only its assigned experts: it downloads and uploads only
  them and routes tokens only among them (``ExpertModel.restrict_routing``).

An expert's tensors travel under :func:`expert_key`: its own parameter names for per-module
experts, ``name@expert{layer}.{e}`` for its slice of a fused tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hfedmoe.algorithms.aggregation import weighted_average
from hfedmoe.algorithms.base import ClientTask, ClientUpdate, Weights
from hfedmoe.algorithms.importance import select_active
from hfedmoe.algorithms.sparse_aggregation import combine, usage
from hfedmoe.algorithms.validation import UploadSpec
from hfedmoe.model.experts import ExpertEntry, ExpertId, ExpertModel, RoutingCapture
from hfedmoe.model.state import load_shared_state
from hfedmoe.training import StepHooks

ASSIGNED = "assigned-experts"
STRICT = "strict-routing"


@dataclass(frozen=True)
class ExpertLayout:
    """Where experts and routers live in a model's weights (the server learns it in bind)."""

    shape: tuple[int, int]  # (L, E)
    experts: dict[ExpertId, list[ExpertEntry]]
    routers: dict[int, list[str]]  # MoE layer -> router parameter names

    @classmethod
    def of(cls, model: nn.Module) -> ExpertLayout:
        em = ExpertModel(model)
        return cls(em.shape, em.expert_entries(), em.router_entries())

    @property
    def expert_names(self) -> set[str]:
        return {x.state_name for es in self.experts.values() for x in es}

    @property
    def router_names(self) -> list[str]:
        return [n for names in self.routers.values() for n in names]


def expert_key(entry: ExpertEntry, expert: ExpertId) -> str:
    """The upload key of one expert's part of a state-dict entry."""
    layer, e = expert
    return entry.state_name if entry.dim is None else f"{entry.state_name}@expert{layer}.{e}"


def uploaded_mask(layout: ExpertLayout, weights: Weights) -> torch.Tensor:
    """(L, E) bool: the experts whose tensors are all in one reply (validation rejects a reply
    with an expert in part)."""
    sent = torch.zeros(layout.shape, dtype=torch.bool)
    for expert, entries in layout.experts.items():
        sent[expert] = all(expert_key(x, expert) in weights for x in entries)
    return sent


def assigned_mask(mask_LE: torch.Tensor) -> list[int]:
    """The ``ASSIGNED`` task value of an (L, E) mask."""
    return mask_LE.flatten().nonzero().flatten().tolist()


def mask_of(task: ClientTask, shape: tuple[int, int]) -> torch.Tensor | None:
    """The (L, E) mask of a task's ``ASSIGNED`` experts, None if it has none."""
    if ASSIGNED not in task.config:
        return None
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    mask[torch.tensor(task.config[ASSIGNED], dtype=torch.long)] = True
    return mask.view(shape)


def held_experts(score_LE: torch.Tensor, budget: int) -> torch.Tensor:
    """A held set for strict routing: the best expert of each layer, then the best of the
    rest, by ``score_LE``, ``budget`` in all (at least one per layer, so every layer can
    route). (L, E) bool."""
    L, E = score_LE.shape
    if budget < L:
        raise ValueError(f"strict mode needs a budget of at least one expert per layer ({L})")
    held = torch.zeros(L, E, dtype=torch.bool)
    held[torch.arange(L), score_LE.argmax(1)] = True
    return held | select_active(score_LE, ~held, budget - L, "global")


def download(layout: ExpertLayout, global_weights: Weights, held_LE: torch.Tensor) -> Weights:
    """A strict client's download: every non-expert tensor, and the held experts by key."""
    expert_names = layout.expert_names
    weights = {n: t for n, t in global_weights.items() if n not in expert_names}
    for expert, entries in layout.experts.items():
        if held_LE[expert]:
            for x in entries:
                weights[expert_key(x, expert)] = x.take(global_weights[x.state_name])
    return weights


def load_held(
    model: nn.Module,
    weights: Weights,
    entries: dict[ExpertId, list[ExpertEntry]],
    held_LE: torch.Tensor,
) -> None:
    """Load what :func:`download` sent: shared tensors by name, held experts into place."""
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


def upload_weights(
    model: nn.Module, send_LE: torch.Tensor, entries: dict[ExpertId, list[ExpertEntry]]
) -> Weights:
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


def partial_upload(
    model: nn.Module, exclude: frozenset[str] = frozenset(), stats: tuple[str, ...] = ()
) -> UploadSpec:
    """What :func:`upload_weights` may send: every trainable non-expert tensor (required, less
    ``exclude``) and any experts, by :func:`expert_key`; the (L, E) statistics ``stats`` besides
    the per-expert update counts."""
    layout = ExpertLayout.of(model)
    expert_names = layout.expert_names
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    required = frozenset(n for n in trainable if n not in expert_names and n not in exclude)
    experts = {
        expert_key(x, expert): (x.state_name, None if x.dim is None else x)
        for expert, entries in layout.experts.items()
        for x in entries
    }
    keys = {ex: [expert_key(x, ex) for x in entries] for ex, entries in layout.experts.items()}
    shapes = {name: layout.shape for name in ("expert_updates", *stats)}
    return UploadSpec(required, experts, keys, shapes)


class PartialUploads:
    """Mixin for algorithms whose clients upload with :func:`upload_weights`; ``STATS``: the
    (L, E) statistics its replies carry besides ``expert_updates``."""

    STATS: tuple[str, ...] = ()

    def upload_spec(self, model: nn.Module) -> UploadSpec:
        return partial_upload(model, stats=self.STATS)


def aggregate_experts(
    layout: ExpertLayout,
    global_weights: Weights,
    updates: Sequence[ClientUpdate],
    w_CLE: torch.Tensor,
) -> Weights:
    """Each expert as sum_c w_c(e) x_c(e) over the clients with w_c(e) > 0 (they uploaded it);
    an expert with no such client keeps its global value. ``w_CLE`` sums to 1 or 0 per expert."""
    new = dict(global_weights)
    for (layer, e), entries in layout.experts.items():
        w_C = w_CLE[:, layer, e]
        holders = torch.nonzero(w_C).flatten().tolist()
        if not holders:
            continue
        for entry in entries:
            parts = [updates[c].weights[expert_key(entry, (layer, e))] for c in holders]
            new[entry.state_name] = entry.put(new[entry.state_name], combine(parts, w_C[holders]))
    return new


def fedavg_rest(
    layout: ExpertLayout,
    new: Weights,
    global_weights: Weights,
    updates: Sequence[ClientUpdate],
    also: Sequence[str] = (),
) -> Weights:
    """FedAvg by |D_c| of the shared tensors (neither expert nor router) and of ``also``."""
    skip = layout.expert_names | set(layout.router_names)
    names = [n for n in global_weights if n not in skip] + list(also)
    n_C = [u.num_examples for u in updates]
    for name in names:
        if all(name in u.weights for u in updates):
            new[name] = weighted_average([u.weights[name] for u in updates], n_C)
    return new


class GateUsage:
    """Running sum of G_e(x) over a client's samples; :meth:`value` is u_c(e), eq. (16)."""

    def __init__(self) -> None:
        self.gate_sum: torch.Tensor | None = None  # sum over samples of G_e(x), (L, E)
        self.samples = 0

    def add(self, G_LBE: torch.Tensor) -> None:
        gate_sum = G_LBE.sum(1)
        self.gate_sum = gate_sum if self.gate_sum is None else self.gate_sum + gate_sum
        self.samples += G_LBE.shape[1]

    def value(self) -> torch.Tensor:
        return usage(self.gate_sum, self.samples)


class AssignedExperts(StepHooks):
    """Update the assigned experts on the batches routed to them (all routed ones if none),
    and record the client's usage u_c(e) (``self.usage``)."""

    def __init__(self, assigned_LE: torch.Tensor | None):
        self.assigned_LE = assigned_LE
        self.usage = GateUsage()

    @classmethod
    def from_task(cls, task: ClientTask, shape: tuple[int, int]) -> AssignedExperts:
        return cls(mask_of(task, shape))

    def select_experts(
        self, capture: RoutingCapture, batch: dict[str, torch.Tensor], routed_LE: torch.Tensor
    ) -> torch.Tensor:
        self.usage.add(capture.sample_probs(batch.get("attention_mask")))
        return routed_LE if self.assigned_LE is None else routed_LE & self.assigned_LE


def own_or_mean(
    scores: Mapping[int, torch.Tensor], client: int, rng: np.random.Generator, shape: tuple
) -> torch.Tensor:
    """A client's per-expert score for assigning it experts: its own from its last round, else
    the mean of every client's, else (nobody has reported yet) a draw from ``rng``."""
    if client in scores:
        return scores[client]
    if scores:
        return torch.stack(list(scores.values())).mean(0)
    return torch.from_numpy(rng.random(shape))
