"""Federated algorithms, selected by name from the config (``algorithm = "fedavg"``)."""

# each module registers its algorithms by name
from hfedmoe.algorithms import (  # noqa: F401
    ablations,
    fedavg,
    fedmoe,
    flexmoe,
    hfedmoe,
    random_subset,
)
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
