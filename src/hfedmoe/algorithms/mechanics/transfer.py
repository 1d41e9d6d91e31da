"""What a client downloads and uploads when it holds or trains only part of the expert pool."""

from __future__ import annotations

import torch
from torch import nn

from hfedmoe.algorithms.mechanics.layout import ExpertLayout, expert_key
from hfedmoe.algorithms.messages import Weights
from hfedmoe.model.experts import ExpertEntry, ExpertId
from hfedmoe.model.state import load_shared_state


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
                for x in es:  # in place: no copy of a whole fused tensor per expert
                    x.write_(params[x.state_name], weights[expert_key(x, expert)])


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
