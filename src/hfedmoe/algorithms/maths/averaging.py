"""Aggregation arithmetic shared by the algorithms: small pure functions over tensors, and the
running weighted sums that let a server fold one reply at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i, accumulated in float64 and cast back to the input dtype."""
    if not tensors or len(tensors) != len(weights):
        raise ValueError("need one weight per tensor and at least one tensor")
    sums = WeightedSums()
    for x, w in zip(tensors, weights, strict=True):
        if w < 0:
            raise ValueError("weights must not be negative")
        sums.add("x", x, float(w))
    if "x" not in sums:
        raise ValueError("weights must sum to a positive number")
    return sums.pop("x")


def accumulator_dtype(dtype: torch.dtype, wide: bool = True) -> torch.dtype:
    """The precision a sum of ``dtype`` tensors is kept in. Wide (the default): float64 for 32-
    and 64-bit floats, float32 for 16-bit ones (twice the parameter's bytes, so a sum of K
    replies loses no more than one rounding of the result). Not wide: ``dtype`` itself (half
    the memory; a weighted mean of K replies then differs from the wide one by at most about
    K u max|x|, u the unit roundoff of ``dtype``: 6e-8 for float32)."""
    if not wide:
        return dtype
    return torch.float64 if dtype.itemsize >= 4 else torch.float32


class WeightedSums:
    """Per key, sum_c m_c x_c and sum_c m_c over the replies added so far, so an aggregate is
    folded one reply at a time instead of holding all K (FLUTE and FederatedScope aggregate the
    same way). A zero mass adds nothing; a key nobody added has no result (the caller keeps the
    previous value). The result does not depend on the order of the adds beyond the rounding of
    the wide accumulator (``accumulator_dtype``)."""

    def __init__(self, wide: bool = True) -> None:
        self.wide = wide  # accumulate in accumulator_dtype's wide precision, or the input's
        self._sum: dict[str, torch.Tensor] = {}
        self._mass: dict[str, float] = {}
        self._dtype: dict[str, torch.dtype] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._sum

    def keys(self) -> list[str]:
        return list(self._sum)

    def add(self, key: str, x: torch.Tensor, mass: float) -> None:
        """Fold m x into ``key``'s sum (m = ``mass`` >= 0)."""
        if mass == 0:
            return
        acc = self._sum.get(key)
        if acc is None:
            self._sum[key] = x.to(accumulator_dtype(x.dtype, self.wide)) * mass
            self._mass[key], self._dtype[key] = mass, x.dtype
        else:
            acc.add_(x, alpha=mass)  # in the accumulator's precision: x is widened elementwise
            self._mass[key] += mass

    def reweigh(self, key: str, x: torch.Tensor, old: float, new: float) -> None:
        """Change the mass of a reply already added as ``old`` x ``x`` to ``new`` (a share
        cap, ``mechanics.merging``): the sum gains (new - old) x, the masses new - old."""
        self._sum[key].add_(x, alpha=new - old)
        self._mass[key] += new - old

    def mass(self, key: str) -> float:
        return self._mass[key]

    def pop(self, key: str, divisor: float | None = None) -> torch.Tensor:
        """``key``'s sum over ``divisor`` (default: the sum of its masses, a weighted mean), in
        the dtype of what was added; the accumulator is freed."""
        acc = self._sum.pop(key)
        mass, dtype = self._mass.pop(key), self._dtype.pop(key)
        return acc.div_(mass if divisor is None else divisor).to(dtype)
