"""One seed controls everything: every random stream is derived from (seed, purpose, ...)."""

from __future__ import annotations

import numpy as np
import torch

# Purposes, so that two streams never coincide.
SAMPLING, CLIENT_TRAIN, DEVICES, STRICT_HELD, RANDOM_SUBSET, FLEX_ASSIGN = 1, 2, 3, 4, 5, 6
FAULTS = 7  # injected client faults (hfedmoe.federation.faults)
ANALYSIS = 8  # the examples `hfedmoe analyze` looks at (hfedmoe.analysis)
HOLDOUT = 9  # the specialisation corpus held out of a data set (seed 0 always: run-independent)
CONSTRUCTION = 10  # building a specialised model (hfedmoe.construction; its own seed)
FLUX_ROLES, FLUX_PROBES = 11, 12  # FLUX's explore draws (server), its SPSA directions (client)
VALIDATION = 13  # the validation split held out of a run's training rows (hfedmoe.data)
OWN_DATA = 15  # the caps' rows of a party's own file (data.clients = "own"; hfedmoe.data)
CLIENT_EVAL = 16  # each client's own held-out share (data.client_test_fraction; hfedmoe.data)
PRIVACY = 14  # the Gaussian noise of a differentially private round (algorithms.mechanics)


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator for ``(seed, *keys)``; independent of call order."""
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def torch_seed_for(seed: int, *keys: int) -> int:
    """A torch seed for ``(seed, *keys)`` (for dropout and other global-RNG users)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_torch(seed: int, *keys: int) -> None:
    torch.manual_seed(torch_seed_for(seed, *keys))
