"""Merging experts that only some clients trained, and FedAvg of everything else."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hfedmoe.algorithms.maths.averaging import weighted_average
from hfedmoe.algorithms.maths.sparse_aggregation import combine
from hfedmoe.algorithms.mechanics.layout import ExpertLayout, expert_key
from hfedmoe.algorithms.messages import ClientUpdate, Weights


def aggregate_experts(
    layout: ExpertLayout,
    global_weights: Weights,
    updates: Sequence[ClientUpdate],
    w_CLE: torch.Tensor,
) -> Weights:
    """Each expert as sum_c w_c(e) x_c(e) over the clients with w_c(e) > 0 (they uploaded it);
    an expert with no such client keeps its global value. ``w_CLE`` sums to 1 or 0 per expert.

    A fused tensor is copied once, on its first merged expert, and every expert is written into
    that copy in place (not one copy of the whole tensor per expert)."""
    new = dict(global_weights)
    copied: set[str] = set()
    for (layer, e), entries in layout.experts.items():
        w_C = w_CLE[:, layer, e]
        holders = torch.nonzero(w_C).flatten().tolist()
        if not holders:
            continue
        for entry in entries:
            parts = [updates[c].weights[expert_key(entry, (layer, e))] for c in holders]
            merged = combine(parts, w_C[holders])
            if entry.dim is None:
                new[entry.state_name] = merged
                continue
            if entry.state_name not in copied:
                new[entry.state_name] = new[entry.state_name].clone()
                copied.add(entry.state_name)
            entry.write_(new[entry.state_name], merged)
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
