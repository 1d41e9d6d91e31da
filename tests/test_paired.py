"""Paired comparisons over seeds, Holm's correction, the difference the seeds can detect, the
censored median of a cost to the target and time to accuracy on the devices, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from hfedmoe.experiment.paired import (
    censored_median,
    detectable_difference,
    device_seconds,
    holm,
    paired_difference,
    slowest_client_seconds,
    to_target,
)


def test_a_difference_whose_interval_holds_zero_is_a_tie():
    # d = 0.1, 0, 0.1: mean 1/15, sd 0.0577, sem 1/30, t(0.975, 2) = 4.3027
    d = paired_difference({0: 0.8, 1: 0.7, 2: 0.9}, {0: 0.7, 1: 0.7, 2: 0.8})
    assert d.seeds == (0, 1, 2)
    assert d.mean == pytest.approx(1 / 15)
    assert d.low == pytest.approx(1 / 15 - 4.302653 / 30, abs=1e-6)
    assert d.high == pytest.approx(1 / 15 + 4.302653 / 30, abs=1e-6)
    assert d.verdict() == "tied"


def test_the_verdict_follows_the_interval_not_the_mean():
    ahead = paired_difference({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.72, 2: 0.58})
    assert ahead.verdict() == "ahead"  # d = 0.1, 0.08, 0.12: half-width 0.0497
    # d = -0.2, -0.1, -0.15: mean -0.15, sem 0.05 / sqrt(3), half-width 0.1242
    behind = paired_difference({0: 0.5, 1: 0.6, 2: 0.55}, {0: 0.7, 1: 0.7, 2: 0.7})
    assert (behind.low, behind.high) == pytest.approx((-0.2742, -0.0258), abs=1e-4)
    assert behind.verdict() == "behind"
    # a larger mean difference over three seeds that disagree is still a tie
    assert paired_difference({0: 0.9, 1: 0.5, 2: 0.6}, {0: 0.5, 1: 0.6, 2: 0.6}).verdict() == "tied"


def test_no_verdict_from_two_seeds_or_from_differences_without_spread():
    # two seeds: the interval is printed (t(0.975, 1) = 12.706) but decides nothing
    two = paired_difference({0: 0.9, 1: 0.8}, {0: 0.8, 1: 0.75})
    assert (two.low, two.high) == pytest.approx((0.075 - 12.7062 * 0.025, 0.075 + 0.3177), abs=1e-3)
    assert two.verdict() == "n/a"
    # one test question (0.005) ahead on every seed: a zero-width interval, not a win
    steps = paired_difference({0: 0.485, 1: 0.5, 2: 0.47}, {0: 0.48, 1: 0.495, 2: 0.465})
    assert steps.high - steps.low == pytest.approx(0, abs=1e-9)
    assert steps.verdict() == "n/a"


def test_only_seeds_both_methods_ran_are_paired():
    d = paired_difference({0: 0.9, 1: 0.8, 5: 0.1}, {1: 0.7, 2: 0.6})
    assert d.seeds == (1,) and d.mean == pytest.approx(0.1)
    assert math.isnan(d.low) and d.verdict() == "n/a"


@given(
    st.lists(st.floats(0, 1), min_size=2, max_size=8),
    st.lists(st.floats(0, 1), min_size=2, max_size=8),
)
def test_swapping_the_methods_mirrors_the_interval(xs, ys):
    n = min(len(xs), len(ys))
    x, y = dict(enumerate(xs[:n])), dict(enumerate(ys[:n]))
    a, b = paired_difference(x, y), paired_difference(y, x)
    assert a.mean == pytest.approx(-b.mean, abs=1e-12)
    assert a.low == pytest.approx(-b.high, abs=1e-9) and a.high == pytest.approx(-b.low, abs=1e-9)
    assert {a.verdict(), b.verdict()} in ({"tied"}, {"ahead", "behind"}, {"n/a"})


def test_the_p_value_is_the_paired_t_tests_and_the_verdict_follows_the_corrected_one():
    x, y = {0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.72, 2: 0.58}  # d = 0.1, 0.08, 0.12
    d = paired_difference(x, y)
    assert d.p == pytest.approx(stats.ttest_rel([0.9, 0.8, 0.7], [0.8, 0.72, 0.58]).pvalue)
    assert d.p == pytest.approx(0.01307, abs=1e-5)  # t = 0.1 / (0.02 / sqrt 3) = 8.66, 2 df
    assert d.sd == pytest.approx(0.02)
    assert d.verdict() == "ahead"  # one comparison: its own p
    assert d.verdict(p_adjusted=0.052) == "tied"  # Holm over several: no longer below 0.05
    # no test without spread or below 3 seeds: p is NaN, whatever the correction
    assert math.isnan(paired_difference({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5}).p)
    assert paired_difference({0: 0.9, 1: 0.8}, {0: 0.8, 1: 0.75}).verdict(0.0) == "n/a"


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1: 0.04, 0.09, 0.08, 0.20; running maximum
    # 0.04, 0.09, 0.09, 0.20; back in the order given
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    # only the first stays below 0.05: three of the four raw p-values were
    assert holm([0.5]) == [0.5]  # one comparison: nothing to correct
    assert holm([0.4, 0.3]) == pytest.approx([0.6, 0.6])  # 0.3 x 2 = 0.6, then max(0.6, 0.4)
    assert holm([0.6, 0.5]) == [1.0, 1.0]  # capped at 1
    # a comparison with no test stays untested and does not count in m
    adjusted = holm([0.01, math.nan, 0.04])
    assert adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.04)
    assert math.isnan(adjusted[1])
    assert holm([]) == []


def test_the_detectable_difference_has_the_asked_power():
    # by the noncentral t: a two-sided test at 0.05 over n seeds finds delta with power 0.8
    for n, sd in ((3, 0.02), (5, 0.03), (10, 1.0)):
        delta = detectable_difference(sd, n)
        critical = stats.t.ppf(0.975, n - 1)
        shift = delta / sd * math.sqrt(n)
        power = stats.nct.sf(critical, n - 1, shift) + stats.nct.cdf(-critical, n - 1, shift)
        assert power == pytest.approx(0.8, abs=1e-6)
    # and by simulation: the paired t-test over 5 seeds drawn with that mean difference
    # rejects 0 in 80% of 40,000 draws (the standard error of that share is 0.002)
    n, delta = 5, detectable_difference(1.0, 5)
    d = np.random.default_rng(0).normal(delta, 1.0, size=(40_000, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1)) == pytest.approx(0.8, abs=0.01)
    # many seeds: the normal approximation (1.960 + 0.842) sd / sqrt(n)
    assert detectable_difference(0.1, 10_000) == pytest.approx(2.8016 * 0.1 / 100, rel=1e-3)
    assert detectable_difference(0.02, 3) == pytest.approx(3.2640 * 0.02, rel=1e-4)
    assert math.isnan(detectable_difference(0.0, 5)) and math.isnan(detectable_difference(1, 1))


def test_the_censored_median_by_hand():
    # five seeds, two never reach the target: they count as the slowest, so the median is the
    # third smallest of (1, 2, 3, inf, inf) = 3, not the mean of the reaching ones (2)
    assert censored_median([3.0, None, 1.0, 2.0, None]) == 3.0
    assert censored_median([3.0, None, 1.0, None, None]) is None  # 2 of 5: fewer than half
    assert censored_median([4.0, 1.0, None, None]) == 4.0  # exactly half: the 2nd smallest
    assert censored_median([4.0, 1.0, 2.0]) == 2.0  # all reach: the usual median
    assert censored_median([]) is None
    cost = to_target([5.0, None, 7.0])
    assert (cost.median, cost.reached, cost.seeds) == (7.0, 2, 3)


SPEEDS = {"phone": 1e9, "laptop": 1e10, "mystery": None}


def _client(tier, step=1e9, steps=2, extra=0.0, status="ok", failure=""):
    return {
        "tier": tier,
        "status": status,
        "failure": failure,
        "step_flops_predicted": step,
        "steps": steps,
        "extra_flops_predicted": extra,
    }


def test_a_round_takes_as_long_as_its_slowest_client_on_its_own_device():
    clients = [
        _client("phone", extra=1e9),  # (2 x 1e9 + 1e9) / 1e9 = 3 s
        _client("laptop", step=1e10),  # 2 x 1e10 / 1e10 = 2 s
        _client("phone", step=1e12, status="failed", failure="budget"),  # refused: 0 s
    ]
    assert slowest_client_seconds(clients, SPEEDS) == pytest.approx(3.0)
    assert slowest_client_seconds([_client("mystery")], SPEEDS) is None  # no FLOP/s known


def test_a_failed_client_counts_the_round_timeout_unless_it_was_refused_before_training():
    ok = _client("phone")  # 2 s
    for failure in ("error", "no-reply", "worker-died", "malformed", "bound"):
        failed = _client("mystery", status="failed", failure=failure)
        # the server waits for it up to the timeout: that, not 0, is the round's time
        assert slowest_client_seconds([ok, failed], SPEEDS, round_timeout=30.0) == 30.0
        # without a timeout, what it spent is not recorded: unknown, not left out
        assert slowest_client_seconds([ok, failed], SPEEDS) is None
    refused = _client("mystery", status="failed", failure="budget")
    assert slowest_client_seconds([ok, refused], SPEEDS) == pytest.approx(2.0)
    assert slowest_client_seconds([refused], SPEEDS, round_timeout=30.0) == 0.0


def test_a_pass_that_overlaps_aggregation_takes_none_of_the_rounds_time():
    """FLUX's stale profiling (METHOD.md §9a) runs while the server aggregates: its FLOPs are
    the client's compute but not the round's time. (2 x 1e9 + 1e9) / 1e9 = 3 s, not 8 s."""
    client = {**_client("phone", extra=1e9), "overlapped_flops_predicted": 5e9}
    assert slowest_client_seconds([client], SPEEDS) == pytest.approx(3.0)


def test_time_on_the_devices_sums_the_slowest_clients():
    rounds = [
        {"round": 0, "test_accuracy": 0.2, "clients": []},
        {"round": 1, "test_accuracy": 0.6, "clients": [_client("phone")]},  # 2 s
        {"round": 2, "test_accuracy": 0.85, "clients": [_client("laptop", step=5e10)]},  # 10 s
        {"round": 3, "test_accuracy": 0.95, "clients": [_client("phone")]},
    ]
    np.testing.assert_allclose(device_seconds(rounds, SPEEDS), [0.0, 2.0, 12.0, 14.0])
    rounds[3]["clients"] = [_client("mystery")]
    assert device_seconds(rounds, SPEEDS) is None  # one unknown device: no time line
