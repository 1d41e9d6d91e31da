"""Paired comparisons over seeds, the correction over a setting's comparisons, and the cost a
run takes to reach a target.

Seeds share partitions, device tiers and initial weights across methods (``hfedmoe compare``),
so two methods are compared seed by seed: the per-seed differences d_s = x_s - y_s, their mean,
a 95% Student-t interval, mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n), and the two-sided paired
t-test's p-value. A report compares every method with one reference on one primary end point,
fixed before the results (:mod:`hfedmoe.experiment.protocol`); the p-values of those
comparisons are corrected together by Holm's step-down procedure (:func:`holm`). The verdict is
*ahead* or *behind* when the corrected p is below :data:`ALPHA` and the interval lies on that
side of 0, *tied* otherwise. It is *n/a* with fewer than :data:`MIN_SEEDS` paired seeds, or when
the differences have no spread: accuracies move in steps of one test example, so two or three
seeds can differ by the same step by chance, and their zero-width interval would call one
question a win. :func:`detectable_difference` says how large a difference the seeds could
have found.

A cost to the target (rounds, client compute, time on the devices) is summarised over all
seeds by :func:`censored_median`: a seed that never reached the target counts, as one slower
than every seed that did.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

#: The fewest paired seeds that give a verdict (the verdict grid runs at least 3 per cell): one
#: degree of freedom (two seeds) makes the t-interval 12.7 standard errors wide either way.
MIN_SEEDS = 3
#: The family-wise error rate of a setting's verdicts (Holm), and the level of the interval.
ALPHA = 0.05
#: The power :func:`detectable_difference` asks of the test.
POWER = 0.8


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of x - y over the ``seeds`` both have, with its ``low``..``high`` interval, the
    differences' sample standard deviation ``sd`` and the two-sided paired t-test's ``p`` (NaN
    where there is no test: one seed, or differences with no spread)."""

    seeds: tuple[int, ...]
    mean: float
    low: float
    high: float
    sd: float = math.nan
    p: float = math.nan

    @property
    def enough_seeds(self) -> bool:
        """At least MIN_SEEDS paired seeds: below that an interval, a p-value or a detectable
        difference is wider than any accuracy can move (two seeds: 12.7 standard errors)."""
        return len(self.seeds) >= MIN_SEEDS

    @property
    def testable(self) -> bool:
        """Enough seeds and some spread: anything less decides nothing (module docstring)."""
        return self.enough_seeds and not math.isclose(self.low, self.high, abs_tol=1e-9)

    def verdict(self, p_adjusted: float | None = None) -> str:
        """ahead, behind, tied or n/a, from ``p_adjusted`` (this comparison's p after the
        correction over its setting's comparisons, :func:`holm`; default: its own p, a
        setting of one comparison) and the interval, which must agree."""
        if not self.testable:
            return "n/a"
        p = self.p if p_adjusted is None else p_adjusted
        if p < ALPHA and self.low > 0:
            return "ahead"
        if p < ALPHA and self.high < 0:
            return "behind"
        return "tied"


def paired_difference(
    x: Mapping[int, float], y: Mapping[int, float], confidence: float = 1 - ALPHA
) -> PairedDifference:
    """x - y per seed (the seeds both have), its mean, ``confidence`` t-interval and the paired
    t-test of mean 0 (two-sided)."""
    seeds = tuple(sorted(set(x) & set(y)))
    d = np.array([x[s] - y[s] for s in seeds], dtype=float)
    if len(d) == 0:
        return PairedDifference(seeds, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if len(d) < 2:
        return PairedDifference(seeds, mean, math.nan, math.nan)
    sd, df = float(d.std(ddof=1)), len(d) - 1
    sem = sd / math.sqrt(len(d))
    half = float(stats.t.ppf(0.5 + confidence / 2, df) * sem)
    p = float(2 * stats.t.sf(abs(mean) / sem, df)) if sem > 1e-12 else math.nan
    return PairedDifference(seeds, mean, mean - half, mean + half, sd, p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    A setting compares every method with the reference, so with m comparisons one of them
    crosses 0.05 by chance far more often than 5% of the time. Holm's procedure keeps that
    chance (the family-wise error rate) at 0.05 and is never less powerful than Bonferroni:
    sort the p-values, multiply the i-th smallest (from 1) by m - i + 1, cap at 1, and make
    the sequence non-decreasing; a comparison is significant when its adjusted p < 0.05.
    NaN entries (a comparison with no test) stay NaN and do not count in m: they decide
    nothing either way.
    """
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(tested)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference a two-sided paired t-test over ``n`` seeds at level
    ``alpha`` finds with probability ``power``, if the per-seed differences spread with
    standard deviation ``sd``: what a tie over these seeds can and cannot rule out.

    The test statistic then follows a noncentral t with n - 1 degrees of freedom and
    noncentrality delta sqrt(n) / sd; the difference delta is the root of its power minus
    ``power``. NaN with fewer than 2 seeds or no spread."""
    if n < 2 or not sd > 0:
        return math.nan
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(effect: float) -> float:  # effect = delta / sd
        shift = effect * math.sqrt(n)
        # the lower tail P(T < -c) as the upper tail of the mirrored shift: scipy's cdf gives
        # NaN where that tail is tiny, its sf does not
        upper, lower = stats.nct.sf(critical, df, shift), stats.nct.sf(critical, df, -shift)
        return upper + lower - power

    # twice the normal approximation's effect brackets the root; few seeds need more
    high = 2 * (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) / math.sqrt(n)
    while shortfall(high) < 0:
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-12)) * sd


def censored_median(values: Sequence[float | None]) -> float | None:
    """The median cost to a target over seeds, ``None`` for a seed that never reached it.

    A seed that never reached the target is censored at its total cost: it would have needed
    more than it spent, and it counts as slower than every seed that did (averaging only the
    seeds that reached the target reports the lucky ones). The median is then the smallest
    cost by which at least half of the seeds had reached the target: the ceil(n/2)-th smallest
    reaching cost; None ("not reached") when fewer than half reached it. With every seed
    reaching it, this is the usual median for odd n and the lower middle value for even n.
    It is the Kaplan-Meier median when no censored seed stopped before it, and later than
    that otherwise (never earlier): the conservative reading."""
    reached = sorted(v for v in values if v is not None)
    k = math.ceil(len(values) / 2)
    return reached[k - 1] if k and len(reached) >= k else None


@dataclass(frozen=True)
class ToTarget:
    """A cost to the target over a row's seeds: the censored median (None: fewer than half
    reached it) and how many of the ``seeds`` reached it."""

    median: float | None
    reached: int
    seeds: int


def to_target(values: Sequence[float | None]) -> ToTarget:
    """:func:`censored_median` with the share that reached the target."""
    return ToTarget(censored_median(values), sum(v is not None for v in values), len(values))


#: A failure that happens before any training: the client's own cost model refused a request
#: beyond its device's memory or deadline (``hfedmoe.budget.check_request``).
REFUSED = "budget"


def client_seconds(
    client: Mapping, flops_per_second: Mapping[str, float | None], round_timeout: float | None
) -> float | None:
    """What one sampled client spent on its device in a round, in seconds.

    * Trained (status ok): its predicted work (local steps x step FLOPs, plus any extra pass on
      the round's critical path such as eq. (16) or FLUX's profiling at a first participation)
      over its tier's FLOP/s; None if the tier has no FLOP/s or no FLOPs were recorded. A pass
      that overlaps the server's aggregation (``overlapped_flops_predicted``: FLUX's stale
      profiling, METHOD.md §9a) is not on the critical path and is left out.
    * Refused over its budget (failure ``budget``): nothing: the client refuses before it
      trains.
    * Failed otherwise (raised, died, no reply or a late one, a reply the server rejected): the
      run's round timeout, the longest the server waits for it; one that failed sooner spent
      at most that. Without a timeout the time it spent is not recorded: None, so the run has
      no device time rather than one that leaves the failed client out.
    """
    if client.get("status") != "ok":
        return 0.0 if client.get("failure") == REFUSED else round_timeout
    speed = flops_per_second.get(client.get("tier") or "")
    step, steps = client.get("step_flops_predicted"), client.get("steps")
    if not speed or step is None or steps is None:
        return None
    return (step * steps + (client.get("extra_flops_predicted") or 0.0)) / speed


def slowest_client_seconds(
    clients: list[dict],
    flops_per_second: Mapping[str, float | None],
    round_timeout: float | None = None,
) -> float | None:
    """A round's time on the devices: the slowest sampled client's (:func:`client_seconds`),
    failed clients included; None if one is unknown."""
    times = [client_seconds(c, flops_per_second, round_timeout) for c in clients]
    if any(t is None for t in times):
        return None
    return max((t for t in times if t is not None), default=0.0)


def device_seconds(
    rounds: list[dict],
    flops_per_second: Mapping[str, float | None],
    round_timeout: float | None = None,
) -> np.ndarray | None:
    """Cumulative time on the devices after each round (round 0: 0): the slowest sampled
    client's time (:func:`slowest_client_seconds`) summed; None if a time is unknown. Its value
    at the round that first reaches a target is the time to accuracy (FLUX's metric)."""
    per_round = [0.0]
    for record in rounds[1:]:
        seconds = slowest_client_seconds(record["clients"], flops_per_second, round_timeout)
        if seconds is None:
            return None
        per_round.append(seconds)
    return np.cumsum(per_round)
