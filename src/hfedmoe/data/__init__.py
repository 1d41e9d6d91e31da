"""Data sets and their federated partitions."""

from hfedmoe.data.datasets import load_dataset
from hfedmoe.data.partition import partition_indices
from hfedmoe.data.text import TextDataset

__all__ = ["TextDataset", "load_dataset", "partition_indices"]
