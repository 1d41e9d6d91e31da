"""The privacy accountant of client-level DP (``[privacy]``): Google's ``dp-accounting`` RDP
accountant, never arithmetic of our own (its conversions from Renyi DP to (epsilon, delta) are
the part that is easy to get wrong).

What it is told (``maths.privacy`` has the mechanism): each round samples ``sample_size`` of
the ``num_clients`` clients without replacement and a trusted server releases the sum of their
clipped updates plus Gaussian noise of ``noise_multiplier`` times the sum's replace-one
sensitivity: ``SampledWithoutReplacementDpEvent(N, k, GaussianDpEvent(z))``, composed over the
rounds, under ``NeighboringRelation.REPLACE_ONE`` (the only relation the library accounts
fixed-size sampling under; Wang, Balle and Kasiviswanathan, AISTATS 2019).

With noise on each client (local DP, ``sample_size = None``) every client's reply is its own
Gaussian release, ``GaussianDpEvent(z)``, composed over the rounds: the server sees who it
sampled, so sampling amplifies nothing, and the epsilon is a client's that took part in every
round (the worst case).
"""

from __future__ import annotations

import dp_accounting
from dp_accounting.rdp import RdpAccountant

#: the delta used when none is given: 1e-5, or 1/N^1.1 where that is smaller (N clients)
DEFAULT_DELTA = 1e-5


def default_delta(num_clients: int) -> float:
    """min(1e-5, 1 / N^1.1): a delta below 1/N, so that "leak one client whole" is not
    within the guarantee."""
    return min(DEFAULT_DELTA, num_clients**-1.1)


def _event(
    noise_multiplier: float, rounds: int, num_clients: int, sample_size: int | None
) -> dp_accounting.DpEvent:
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_size is not None:
        event = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, sample_size, event)
    return dp_accounting.SelfComposedDpEvent(event, rounds)


def _accountant() -> RdpAccountant:
    return RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)


def epsilon(
    noise_multiplier: float,
    rounds: int,
    num_clients: int,
    sample_size: int | None,
    delta: float,
) -> float:
    """The epsilon at ``delta`` spent after ``rounds`` rounds (0 before the first);
    ``sample_size`` None: noise on each client (local DP)."""
    if rounds == 0:
        return 0.0
    accountant = _accountant()
    accountant.compose(_event(noise_multiplier, rounds, num_clients, sample_size))
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(
    target_epsilon: float,
    rounds: int,
    num_clients: int,
    sample_size: int | None,
    delta: float,
) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds spend at most ``target_epsilon``
    at ``delta`` (the library's calibration, a bracketed search)."""
    return float(
        dp_accounting.calibrate_dp_mechanism(
            _accountant,
            lambda z: _event(z, rounds, num_clients, sample_size),
            target_epsilon,
            delta,
            dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        )
    )
