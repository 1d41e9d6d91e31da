"""Data: the shipped BBC News files, a seeded stratified split, and client partitions."""

from __future__ import annotations

import numpy as np
import pytest

from hfedmoe.config import DataConfig
from hfedmoe.data import load_dataset, partition_indices
from hfedmoe.data.datasets import stratified_split
from hfedmoe.data.tokenized import shuffled_batches
from hfedmoe.errors import HFedMoEError


def test_bbc_news_is_read_with_sorted_class_names():
    split = load_dataset(DataConfig(), seed=0)
    assert len(split.train) + len(split.test) == 2225
    assert split.train.label_names == ("business", "entertainment", "politics", "sports", "tech")
    counts = np.bincount(np.concatenate([split.train.labels, split.test.labels]))
    assert counts.tolist() == [510, 386, 417, 511, 401]


def test_stratified_split_by_hand():
    labels = np.array([0] * 10 + [1] * 5)
    train, test = stratified_split(labels, 0.2, seed=1)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(15))
    assert np.bincount(labels[test]).tolist() == [2, 1]  # 20% of 10, round(20% of 5)


@pytest.mark.parametrize("partitioner", ["dirichlet", "iid"])
def test_partitions_are_disjoint_covering_and_deterministic(partitioner):
    labels = np.random.default_rng(0).integers(0, 5, size=500)
    cfg = DataConfig(partitioner=partitioner, dirichlet_alpha=0.5, min_partition_size=10)
    parts = partition_indices(labels, 6, cfg, seed=7)
    everything = np.concatenate(parts)
    assert len(everything) == len(np.unique(everything)) == 500
    assert min(len(p) for p in parts) >= 10
    again = partition_indices(labels, 6, cfg, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(labels, 6, cfg, seed=8)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_skews_labels_more_for_smaller_alpha():
    labels = np.repeat(np.arange(5), 200)

    def mean_max_share(alpha):
        parts = partition_indices(labels, 5, DataConfig(dirichlet_alpha=alpha), seed=0)
        return np.mean([np.bincount(labels[p], minlength=5).max() / len(p) for p in parts])

    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.2


def test_partition_too_small_is_an_input_error():
    with pytest.raises(HFedMoEError, match="min_partition_size"):
        partition_indices(np.zeros(20, dtype=int), 5, DataConfig(min_partition_size=10), seed=0)


def test_shuffled_batches_cycle_through_epochs():
    rng = np.random.default_rng(0)
    batches = list(shuffled_batches(5, 2, steps=5, rng=rng))
    assert [len(b) for b in batches] == [2, 2, 2, 2, 2]
    assert sorted(np.concatenate(batches[:2]).tolist()) == sorted(set(np.concatenate(batches[:2])))
