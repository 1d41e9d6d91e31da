"""Paired comparisons over seeds and time to accuracy on the devices, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hfedmoe.experiment.paired import (
    device_seconds,
    device_seconds_to,
    paired_difference,
    slowest_client_seconds,
)


def test_a_difference_whose_interval_holds_zero_is_a_tie():
    # d = 0.1, 0, 0.1: mean 1/15, sd 0.0577, sem 1/30, t(0.975, 2) = 4.3027
    d = paired_difference({0: 0.8, 1: 0.7, 2: 0.9}, {0: 0.7, 1: 0.7, 2: 0.8})
    assert d.seeds == (0, 1, 2)
    assert d.mean == pytest.approx(1 / 15)
    assert d.low == pytest.approx(1 / 15 - 4.302653 / 30, abs=1e-6)
    assert d.high == pytest.approx(1 / 15 + 4.302653 / 30, abs=1e-6)
    assert d.verdict == "tied"


def test_the_verdict_follows_the_interval_not_the_mean():
    ahead = paired_difference({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.72, 2: 0.58})
    assert ahead.verdict == "ahead"  # d = 0.1, 0.08, 0.12: half-width 0.0497
    # d = -0.2, -0.1, -0.15: mean -0.15, sem 0.05 / sqrt(3), half-width 0.1242
    behind = paired_difference({0: 0.5, 1: 0.6, 2: 0.55}, {0: 0.7, 1: 0.7, 2: 0.7})
    assert (behind.low, behind.high) == pytest.approx((-0.2742, -0.0258), abs=1e-4)
    assert behind.verdict == "behind"
    # a larger mean difference over three seeds that disagree is still a tie
    assert paired_difference({0: 0.9, 1: 0.5, 2: 0.6}, {0: 0.5, 1: 0.6, 2: 0.6}).verdict == "tied"


def test_no_verdict_from_two_seeds_or_from_differences_without_spread():
    # two seeds: the interval is printed (t(0.975, 1) = 12.706) but decides nothing
    two = paired_difference({0: 0.9, 1: 0.8}, {0: 0.8, 1: 0.75})
    assert (two.low, two.high) == pytest.approx((0.075 - 12.7062 * 0.025, 0.075 + 0.3177), abs=1e-3)
    assert two.verdict == "n/a"
    # one test question (0.005) ahead on every seed: a zero-width interval, not a win
    steps = paired_difference({0: 0.485, 1: 0.5, 2: 0.47}, {0: 0.48, 1: 0.495, 2: 0.465})
    assert steps.high - steps.low == pytest.approx(0, abs=1e-9)
    assert steps.verdict == "n/a"


def test_only_seeds_both_methods_ran_are_paired():
    d = paired_difference({0: 0.9, 1: 0.8, 5: 0.1}, {1: 0.7, 2: 0.6})
    assert d.seeds == (1,) and d.mean == pytest.approx(0.1)
    assert math.isnan(d.low) and d.verdict == "n/a"


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
    assert {a.verdict, b.verdict} in ({"tied"}, {"ahead", "behind"}, {"n/a"})


SPEEDS = {"phone": 1e9, "laptop": 1e10, "mystery": None}


def _client(tier, step=1e9, steps=2, extra=0.0, status="ok"):
    return {
        "tier": tier,
        "status": status,
        "step_flops_predicted": step,
        "steps": steps,
        "extra_flops_predicted": extra,
    }


def test_a_round_takes_as_long_as_its_slowest_client_on_its_own_device():
    clients = [
        _client("phone", extra=1e9),  # (2 x 1e9 + 1e9) / 1e9 = 3 s
        _client("laptop", step=1e10),  # 2 x 1e10 / 1e10 = 2 s
        _client("phone", step=1e12, status="failed"),  # failed: not waited for
    ]
    assert slowest_client_seconds(clients, SPEEDS) == pytest.approx(3.0)
    assert slowest_client_seconds([_client("mystery")], SPEEDS) is None  # no FLOP/s known


def test_a_pass_that_overlaps_aggregation_takes_none_of_the_rounds_time():
    """FLUX's stale profiling (METHOD.md §9a) runs while the server aggregates: its FLOPs are
    the client's compute but not the round's time. (2 x 1e9 + 1e9) / 1e9 = 3 s, not 8 s."""
    client = {**_client("phone", extra=1e9), "overlapped_flops_predicted": 5e9}
    assert slowest_client_seconds([client], SPEEDS) == pytest.approx(3.0)


def test_time_to_accuracy_sums_the_slowest_clients_until_the_target():
    rounds = [
        {"round": 0, "test_accuracy": 0.2, "clients": []},
        {"round": 1, "test_accuracy": 0.6, "clients": [_client("phone")]},  # 2 s
        {"round": 2, "test_accuracy": 0.85, "clients": [_client("laptop", step=5e10)]},  # 10 s
        {"round": 3, "test_accuracy": 0.95, "clients": [_client("phone")]},
    ]
    assert device_seconds_to(rounds, 0.8, SPEEDS) == pytest.approx(12.0)
    assert device_seconds_to(rounds, 0.1, SPEEDS) == 0.0  # reached before any training
    assert device_seconds_to(rounds, 0.99, SPEEDS) is None  # never reached
    np.testing.assert_allclose(device_seconds(rounds, SPEEDS), [0.0, 2.0, 12.0, 14.0])
    rounds[3]["clients"] = [_client("mystery")]
    assert device_seconds(rounds, SPEEDS) is None  # one unknown device: no time line
