"""Non-IID partitions of a training set over clients, via flwr-datasets partitioners."""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from hfedmoe.config import DataConfig
from hfedmoe.errors import HFedMoEError


def partition_indices(
    labels: np.ndarray, num_clients: int, cfg: DataConfig, seed: int
) -> list[np.ndarray]:
    """Row indices of the training set held by each client (sorted, disjoint, covering).

    ``dirichlet``: per class, client shares drawn from Dir(alpha) (flwr-datasets'
    DirichletPartitioner, resampled until every client holds ``min_partition_size`` rows).
    ``iid``: equal random shares.
    """
    table = Dataset.from_dict({"label": labels.tolist(), "row": list(range(len(labels)))})
    partitioner: Partitioner
    if cfg.partitioner == "dirichlet":
        if cfg.min_partition_size * num_clients > len(labels):
            raise HFedMoEError(
                f"data.min_partition_size: {cfg.min_partition_size} rows x {num_clients} clients "
                f"exceeds the {len(labels)} training rows"
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
        parts = [
            np.sort(np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64))
            for i in range(num_clients)
        ]
    except ValueError as exc:  # the Dirichlet sampler gives up after many resamples
        raise HFedMoEError(f"data.dirichlet_alpha: could not partition: {exc}") from None
    return parts
