"""Algorithms: aggregation arithmetic by hand, FedAvg's invariants, the registry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfedmoe.algorithms import ALGORITHMS, ClientUpdate, build_algorithm
from hfedmoe.algorithms.maths.averaging import WeightedSums, accumulator_dtype, weighted_average
from hfedmoe.foundation.config import validate
from hfedmoe.foundation.errors import ConfigError


def test_weighted_average_by_hand():
    # (1*[1, 2] + 3*[5, 6]) / 4 = [4, 5]
    out = weighted_average([torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0])], [1, 3])
    assert torch.equal(out, torch.tensor([4.0, 5.0]))
    assert out.dtype == torch.float32


def test_weighted_average_rejects_degenerate_input():
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([torch.zeros(1)], [0])


def _fedavg():
    return build_algorithm(validate({"algorithm": "fedavg"}))


def test_fedavg_weights_by_example_count():
    glob = {"w": torch.tensor([0.0]), "b": torch.tensor([9.0])}
    updates = {
        7: ClientUpdate({"w": torch.tensor([2.0]), "b": torch.tensor([1.0])}, num_examples=10),
        3: ClientUpdate({"w": torch.tensor([8.0]), "b": torch.tensor([3.0])}, num_examples=30),
    }
    new = _fedavg().aggregate(1, glob, updates)
    assert torch.equal(new["w"], torch.tensor([6.5]))  # (10*2 + 30*8) / 40
    assert torch.equal(new["b"], torch.tensor([2.5]))  # (10*1 + 30*3) / 40


def test_fedavg_keeps_parameters_nobody_sent():
    glob = {"w": torch.tensor([1.0]), "frozen": torch.tensor([4.0])}
    new = _fedavg().aggregate(1, glob, {1: ClientUpdate({"w": torch.tensor([3.0])}, 5)})
    assert torch.equal(new["frozen"], torch.tensor([4.0]))


tensors = st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=3, max_size=3)


@settings(max_examples=50, deadline=None)
@given(values=st.lists(tensors, min_size=1, max_size=5), sizes=st.data())
def test_fedavg_is_order_free_and_fixes_identical_copies(values, sizes):
    counts = sizes.draw(st.lists(st.integers(1, 100), min_size=len(values), max_size=len(values)))
    updates = {
        node: ClientUpdate({"w": torch.tensor(v)}, n)
        for node, v, n in zip(range(len(values)), values, counts, strict=True)
    }
    glob = {"w": torch.zeros(3)}
    algo = _fedavg()
    forward = algo.aggregate(1, glob, updates)
    backward = algo.aggregate(1, glob, dict(reversed(list(updates.items()))))
    assert torch.equal(forward["w"], backward["w"])
    same = {node: ClientUpdate({"w": torch.tensor(values[0])}, n) for node, n in enumerate(counts)}
    torch.testing.assert_close(algo.aggregate(1, glob, same)["w"], torch.tensor(values[0]))


def test_registry_names_known_algorithms():
    assert "fedavg" in ALGORITHMS
    with pytest.raises(ConfigError, match="algorithm: unknown 'fedprox' \\(expected one of: "):
        build_algorithm(validate({"algorithm": "fedprox"}))


def test_weighted_sums_fold_one_reply_at_a_time_by_hand():
    """sum_c m_c x_c / sum_c m_c, folded as replies come: masses 1 and 3 on [1, 2] and [5, 6]
    give [4, 5]; a zero mass adds nothing; a divisor replaces the masses' sum."""
    sums = WeightedSums()
    sums.add("w", torch.tensor([1.0, 2.0]), 1.0)
    sums.add("w", torch.tensor([5.0, 6.0]), 3.0)
    sums.add("w", torch.tensor([100.0, 100.0]), 0.0)
    sums.add("v", torch.tensor([9.0]), 0.0)
    assert "v" not in sums  # nobody counted: the caller keeps the global value
    out = sums.pop("w")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([4.0, 5.0]))
    sums.add("r", torch.tensor([2.0]), 3.0)
    torch.testing.assert_close(sums.pop("r", divisor=2.0), torch.tensor([3.0]))  # 3 * 2 / 2
    assert accumulator_dtype(torch.float32) == torch.float64
    assert accumulator_dtype(torch.bfloat16) == torch.float32


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3), min_size=1, max_size=6),
    st.randoms(),
)
def test_the_fold_agrees_with_the_closed_form_in_any_order(values, rnd):
    masses = [rnd.randint(1, 50) for _ in values]
    xs = [torch.tensor(v) for v in values]
    order = list(range(len(xs)))
    rnd.shuffle(order)
    sums = WeightedSums()
    for i in order:
        sums.add("x", xs[i], masses[i])
    exact = sum(m * x.double() for m, x in zip(masses, xs, strict=True)) / sum(masses)
    torch.testing.assert_close(sums.pop("x"), exact.float())


def test_native_sums_are_within_k_roundoffs_of_the_wide_ones():
    # federation.sum_precision = "native": float32 running sums of float32 weights, half the
    # memory; a weighted mean of K replies moves by at most about K u max|x| (u = 2^-24)

    assert accumulator_dtype(torch.float32) == torch.float64
    assert accumulator_dtype(torch.float32, wide=False) == torch.float32
    assert accumulator_dtype(torch.bfloat16) == torch.float32
    g = torch.Generator().manual_seed(0)
    replies = [torch.randn(100_000, generator=g) * 10 for _ in range(8)]
    masses = [float(m) for m in torch.randint(1, 500, (8,), generator=g)]
    wide, native = WeightedSums(), WeightedSums(wide=False)
    for x, m in zip(replies, masses, strict=True):
        wide.add("w", x, m)
        native.add("w", x, m)
    assert native._sum["w"].dtype == torch.float32  # the accumulator itself is narrow
    a, b = wide.pop("w"), native.pop("w")
    bound = len(replies) * 2.0**-24 * max(float(x.abs().max()) for x in replies)
    assert 0 < float((a - b).abs().max()) <= 2 * bound  # not exact, and within the bound


def test_the_config_chooses_the_aggregations_sum_precision(tiny_bert_dir):
    from hfedmoe.algorithms import build_algorithm
    from hfedmoe.foundation.config import validate

    from .support.configs import tiny_raw

    for precision, wide in (("wide", True), ("native", False)):
        raw = tiny_raw(tiny_bert_dir, federation={"sum_precision": precision})
        merge = build_algorithm(validate(raw)).merge({"w": torch.zeros(2)})
        assert merge.sums.wide is wide
