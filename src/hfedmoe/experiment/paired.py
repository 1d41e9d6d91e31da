"""Paired comparisons over seeds, and the device-time a run takes to reach a target.

Seeds share partitions, device tiers and initial weights across methods (``hfedmoe compare``),
so two methods are compared seed by seed: the per-seed differences d_s = x_s - y_s, their mean
and a 95% Student-t interval, mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n). The verdict follows
the interval, not the means: *ahead* if it lies above 0, *behind* if below, *tied* if it holds
0. It is *n/a* with fewer than :data:`MIN_SEEDS` paired seeds, or when the differences have no
spread: accuracies move in steps of one test example, so two or three seeds can differ by the
same step by chance, and their zero-width interval would call one question a win.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: The fewest paired seeds that give a verdict (issue 18's grid runs at least 3 per cell): one
#: degree of freedom (two seeds) makes the t-interval 12.7 standard errors wide either way.
MIN_SEEDS = 3


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of x - y over the ``seeds`` both have, with its ``low``..``high`` interval."""

    seeds: tuple[int, ...]
    mean: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        if len(self.seeds) < MIN_SEEDS or math.isclose(self.low, self.high, abs_tol=1e-9):
            return "n/a"
        if self.low > 0:
            return "ahead"
        if self.high < 0:
            return "behind"
        return "tied"


def paired_difference(
    x: Mapping[int, float], y: Mapping[int, float], confidence: float = 0.95
) -> PairedDifference:
    """x - y per seed (the seeds both have), its mean and ``confidence`` t-interval."""
    seeds = tuple(sorted(set(x) & set(y)))
    d = np.array([x[s] - y[s] for s in seeds], dtype=float)
    if len(d) == 0:
        return PairedDifference(seeds, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if len(d) < 2:
        return PairedDifference(seeds, mean, math.nan, math.nan)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return PairedDifference(seeds, mean, mean - half, mean + half)


def slowest_client_seconds(
    clients: list[dict], flops_per_second: Mapping[str, float | None]
) -> float | None:
    """A round's time on the devices: the slowest successful client's predicted work (local
    steps x step FLOPs, plus any extra pass on the round's critical path such as eq. (16) or
    FLUX's profiling at a first participation) over its tier's FLOP/s. A pass that overlaps the
    server's aggregation (``overlapped_flops_predicted``, FLUX's stale profiling, METHOD.md
    §9a) is left out. None if some client's tier has no FLOP/s or no FLOPs were recorded."""
    times = []
    for c in clients:
        if c.get("status") != "ok":
            continue
        speed = flops_per_second.get(c.get("tier") or "")
        step, steps = c.get("step_flops_predicted"), c.get("steps")
        if not speed or step is None or steps is None:
            return None
        times.append((step * steps + (c.get("extra_flops_predicted") or 0.0)) / speed)
    return max(times, default=0.0)


def device_seconds(
    rounds: list[dict], flops_per_second: Mapping[str, float | None]
) -> np.ndarray | None:
    """Cumulative time on the devices after each round (round 0: 0): the slowest participating
    client's time (:func:`slowest_client_seconds`) summed; None if a time is unknown."""
    per_round = [0.0]
    for record in rounds[1:]:
        seconds = slowest_client_seconds(record["clients"], flops_per_second)
        if seconds is None:
            return None
        per_round.append(seconds)
    return np.cumsum(per_round)


def device_seconds_to(
    rounds: list[dict], accuracy_target: float, flops_per_second: Mapping[str, float | None]
) -> float | None:
    """Time to accuracy under the device profiles (FLUX's metric): the slowest participating
    client's time (:func:`slowest_client_seconds`) summed over the rounds until the test
    accuracy first reaches ``accuracy_target``; None if it never does or a time is unknown.
    ``rounds`` are metrics.jsonl's records, round 0 (no training) first."""
    total = 0.0
    for record in rounds:
        if record["round"] > 0:
            seconds = slowest_client_seconds(record["clients"], flops_per_second)
            if seconds is None:
                return None
            total += seconds
        if record["test_accuracy"] >= accuracy_target:
            return total
    return None
