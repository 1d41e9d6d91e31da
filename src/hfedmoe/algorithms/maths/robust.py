"""Robust aggregators (``federation.robust``): coordinate-wise statistics over a round's
replies to one aggregation group, which a minority of arbitrary replies cannot drag far.

Yin et al. (ICML 2018), "Byzantine-robust distributed learning": the coordinate-wise median,
and the trimmed mean that drops the ``k`` largest and ``k`` smallest values of every coordinate
before averaging. Unweighted, as in the paper: a weight a client could inflate is what they
guard against. Pure functions over a (K, ...) stack of K replies.
"""

from __future__ import annotations

import math

import torch


def trim_count(replies: int, fraction: float) -> int:
    """k, the values dropped at each end of a coordinate: floor(fraction x K), leaving at
    least one."""
    return min(math.floor(fraction * replies), (replies - 1) // 2)


def trimmed_mean(x_K: torch.Tensor, fraction: float) -> torch.Tensor:
    """The mean of every coordinate over the K replies, without its ``trim_count`` largest and
    smallest values, in float64."""
    k = trim_count(x_K.shape[0], fraction)
    wide = x_K.to(torch.float64)
    if k == 0:
        return wide.mean(0)
    ordered = wide.sort(0).values
    return ordered[k : x_K.shape[0] - k].mean(0)


def coordinate_median(x_K: torch.Tensor) -> torch.Tensor:
    """The median of every coordinate over the K replies (the mean of the two middle values for
    an even K, so it does not favour the lower one), in float64."""
    ordered = x_K.to(torch.float64).sort(0).values
    K = x_K.shape[0]
    return (ordered[(K - 1) // 2] + ordered[K // 2]) / 2
