"""Federated algorithms, selected by name from the config (``algorithm = "fedavg"``)."""

from hfedmoe.algorithms import fedavg, hfedmoe  # noqa: F401  (they register themselves)
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
