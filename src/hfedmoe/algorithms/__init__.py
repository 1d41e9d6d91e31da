"""Federated algorithms, selected by name from the config (``algorithm = "fedavg"``)."""

from hfedmoe.algorithms import fedavg  # noqa: F401  (registers itself)
from hfedmoe.algorithms.base import (
    ALGORITHMS,
    ClientTask,
    ClientUpdate,
    FederatedAlgorithm,
    Weights,
    build_algorithm,
    register,
)

__all__ = [
    "ALGORITHMS",
    "ClientTask",
    "ClientUpdate",
    "FederatedAlgorithm",
    "Weights",
    "build_algorithm",
    "register",
]
