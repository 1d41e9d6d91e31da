"""Aggregation arithmetic shared by the algorithms: small pure functions over tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i, accumulated in float64 and cast back to the input dtype."""
    if not tensors or len(tensors) != len(weights):
        raise ValueError("need one weight per tensor and at least one tensor")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for x, w in zip(tensors, weights, strict=True):
        acc += x.to(torch.float64) * (w / total)
    return acc.to(tensors[0].dtype)
