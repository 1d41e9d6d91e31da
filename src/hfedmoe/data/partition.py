"""Non-IID partitions of a training set over clients, via flwr-datasets partitioners."""

from __future__ import annotations

import warnings

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from hfedmoe.data.text import TextDataset
from hfedmoe.foundation.config import DataConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.foundation.seeding import CLIENT_EVAL, rng_for


def partition_key(data: TextDataset, cfg: DataConfig) -> np.ndarray:
    """What the partition is over: the rows' groups (natural partition, or a Dirichlet skew of
    groups) or their labels."""
    if cfg.partitioner == "natural" or cfg.partition_by == "group":
        if data.groups is None:
            raise HFedMoEError(f"data.partition_by: data set '{cfg.dataset}' has no groups")
        return data.groups
    return data.labels


def partition_indices(
    keys: np.ndarray, num_clients: int, cfg: DataConfig, seed: int
) -> list[np.ndarray]:
    """Row indices of the training set held by each client (sorted, disjoint, covering).

    ``keys`` is :func:`partition_key` of the rows.
    ``dirichlet``: per key (label or group), client shares drawn from Dir(alpha)
    (flwr-datasets' DirichletPartitioner, resampled until every client holds
    ``min_partition_size`` rows).
    ``iid``: equal random shares.
    ``natural``: the natural ids (movies) shuffled with the seed and dealt out in
    ``num_clients`` runs of equal count, every row of an id to one client.
    """
    if cfg.partitioner == "natural":
        return natural_partition(keys, num_clients, seed)
    table = Dataset.from_dict({"label": keys.tolist(), "row": list(range(len(keys)))})
    partitioner: Partitioner
    if cfg.partitioner == "dirichlet":
        if cfg.min_partition_size * num_clients > len(keys):
            raise HFedMoEError(
                f"data.min_partition_size: {cfg.min_partition_size} rows x {num_clients} clients "
                f"exceeds the {len(keys)} training rows"
            )
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=cfg.dirichlet_alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        partitioner = IidPartitioner(num_partitions=num_clients)
        table = table.shuffle(seed=seed)
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():  # its resampling warning: the error below says it all
            warnings.filterwarnings("ignore", "The specified min_partition_size", UserWarning)
            parts = [
                np.sort(np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64))
                for i in range(num_clients)
            ]
    except ValueError as exc:  # flwr-datasets' Dirichlet sampler gives up after 10 resamples
        if "attempts" not in str(exc):
            raise HFedMoEError(f"data.dirichlet_alpha: could not partition: {exc}") from None
        raise HFedMoEError(
            f"data.dirichlet_alpha: 10 Dirichlet draws at alpha {cfg.dirichlet_alpha} each left "
            f"a client below data.min_partition_size ({cfg.min_partition_size} rows) with "
            f"{len(keys)} training rows for {num_clients} clients (seed {seed}); expected a "
            "larger alpha, a smaller min_partition_size, more rows or another seed"
        ) from None
    return parts


def natural_partition(ids: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Whole natural ids per client, ``num_clients`` clients of (nearly) equal id counts.

    By hand: flwr-datasets' NaturalIdPartitioner makes one partition per id, and its
    GroupedNaturalIdPartitioner derives the number of partitions from a group size, so neither
    gives exactly ``num_clients`` clients for every id count.
    """
    unique = np.unique(ids)
    if len(unique) < num_clients:
        raise HFedMoEError(
            f"federation.num_clients: {num_clients} clients but only {len(unique)} natural ids "
            "(groups) to deal out"
        )
    order = np.random.default_rng(seed).permutation(unique)
    return [np.flatnonzero(np.isin(ids, chunk)) for chunk in np.array_split(order, num_clients)]


def held_out_count(rows: int, fraction: float) -> int:
    """How many of a client's ``rows`` ``data.client_test_fraction`` holds out for federated
    evaluation: the fraction rounded, at least one, and never every row."""
    if fraction == 0:
        return 0
    return max(0, min(max(1, round(fraction * rows)), rows - 1))


def client_test_split(
    rows: int, fraction: float, seed: int, client: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a client's ``rows`` it trains on and holds out (:func:`held_out_count` of
    them, drawn with the seed for this client): the same on the client and the server."""
    held = held_out_count(rows, fraction)
    if held == 0:
        return np.arange(rows), np.arange(0)
    out = np.sort(rng_for(seed, CLIENT_EVAL, client).choice(rows, size=held, replace=False))
    return np.setdiff1d(np.arange(rows), out), out
