"""Federated algorithms as plain torch code (no engine imports), selected by name from the
config (``algorithm = "fedavg"``).

- ``messages``: what server and client exchange (:class:`TrainRequest`, :class:`ClientUpdate`);
- ``base``: the interface every algorithm implements, and the registry;
- ``maths``: the arithmetic, as pure functions with METHOD.md's equation numbers;
- ``mechanics``: what the budget-aware algorithms share, one job a module;
- ``hfedmoe``, ``ablations``, ``variants``: the method, its four ablations and its named
  variants;
- ``baselines``: FedAvg, Random subset, FedMoE, FLEX-MoE, FLUX, FFT-MoE;
- ``controls``: runs that measure a setting beside the methods (``frozen-experts``).
"""

# importing each module registers its algorithms by name
from hfedmoe.algorithms import ablations, controls, hfedmoe, variants  # noqa: F401
from hfedmoe.algorithms.base import (
    ALGORITHMS,
    Aggregation,
    FederatedAlgorithm,
    build_algorithm,
    register,
)
from hfedmoe.algorithms.baselines import (  # noqa: F401
    fedavg,
    fedmoe,
    fftmoe,
    flexmoe,
    flux,
    random_subset,
)
from hfedmoe.algorithms.messages import ClientUpdate, TrainRequest, Weights

__all__ = [
    "ALGORITHMS",
    "Aggregation",
    "ClientUpdate",
    "FederatedAlgorithm",
    "TrainRequest",
    "Weights",
    "build_algorithm",
    "register",
]
