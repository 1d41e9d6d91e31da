"""Data sets and their federated partitions."""

from hfedmoe.data.datasets import TextDataset, load_dataset
from hfedmoe.data.partition import partition_indices

__all__ = ["TextDataset", "load_dataset", "partition_indices"]
