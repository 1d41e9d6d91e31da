"""Where experts and routers live in a model's weights, and the key each expert's tensors travel
under: its own parameter names for per-module experts, ``name@expert{layer}.{e}`` for its slice
of a fused tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hfedmoe.algorithms.messages import Weights
from hfedmoe.model.experts import ExpertEntry, ExpertId, ExpertModel


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
