"""Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018): the arithmetic.

A round releases  w' = w + (sum_c clip_C(Delta_c) + N(0, s^2 I)) / d  for every trainable
tensor at once, where

* Delta_c = x_c - w is client c's update over *every* tensor it uploads, clipped as one vector
  to L2 norm C (eq. P1: clip_C(v) = v min(1, C / ||v||)); a tensor it did not upload counts
  as a zero update, so which experts a client chose is hidden by the noise like the rest;
* d is fixed before the round (the number of clients sampled), never who replied: a client
  that fails or is rejected adds a zero update, still inside the clipping ball (eq. P2);
* s is the noise on the sum: s = z x (sensitivity of the sum) (eq. P3), with z the noise
  multiplier the accountant (``maths.accounting``) is told. Clients are sampled as a fixed-size
  subset without replacement, whose neighbouring relation is "replace one client": two sums
  differ by at most ||u - u'|| <= 2C, so s = 2 z C. (Poisson sampling, add/remove one client,
  would have s = z C with a random number of clients.)

One client therefore moves any release by at most 2C / d before noise, whatever it sends.

Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021) moves C towards a
quantile gamma of the clients' update norms instead of fixing it: each accepted client adds
b_c = 1 if ||Delta_c|| <= C, the server releases the noisy fraction
b = (sum_c b_c + N(0, s_b^2)) / d with the round's weights, and the next round clips at

    C' = C exp(-eta (b - gamma))                                            (eq. P4)

Both releases are one Gaussian mechanism for the accountant: the count's replace-one
sensitivity is 1, so with noise multipliers z_D on the sum (its noise 2 z_D C) and z_b = s_b on
the count, the accountant's z satisfies z^-2 = z_D^-2 + z_b^-2, and for the z it is told the
sum gets

    z_D = (z^-2 - z_b^-2)^(-1/2)                                            (eq. P5)

(Andrew et al., section 3; their add/remove relation halves the count's sensitivity with
b_c - 1/2, ours is replace-one).

With noise on each client (local DP) client c sends w + clip_C(Delta_c) + N(0, s^2 I), s = 2zC,
and the server, which never sees an update in the clear, still bounds what one reply can do:
an honest reply is longer than its clipped update by at most the noise's length, and

    P(||N(0, s^2 I_n)|| > s (sqrt(n) + t)) <= exp(-t^2 / 2)                  (eq. P6)

(Gaussian concentration of the 1-Lipschitz norm around its mean, at most s sqrt(n)), so with
t = 8 the allowance s (sqrt(n) + 8) is exceeded by an honest reply with probability below
1e-13.
Pure functions over tensors; the fold that applies them is ``mechanics.privacy``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch


def joint_norm(tensors: Iterable[torch.Tensor]) -> float:
    """||v|| of the tensors taken as one vector, accumulated in float64."""
    total = 0.0
    for t in tensors:
        total += float(t.to(torch.float64).square().sum())
    return math.sqrt(total)


def clip_factor(norm: float, clip_norm: float) -> float:
    """min(1, C / ||v||) (eq. P1): what an update of norm ``norm`` is scaled by."""
    if clip_norm <= 0:
        raise ValueError("the clipping norm must be positive")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def clipped_deltas(
    update: Mapping[str, torch.Tensor], global_weights: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """Each uploaded tensor's Delta = x - w in float64, scaled jointly by ``clip_factor``;
    and the update's norm before clipping."""
    deltas = {
        k: x.to(torch.float64) - global_weights[k].to(torch.float64) for k, x in update.items()
    }
    norm = joint_norm(deltas.values())
    factor = clip_factor(norm, clip_norm)
    if factor < 1.0:
        for d in deltas.values():
            d.mul_(factor)
    return deltas, norm


def sum_noise_std(noise_multiplier: float, clip_norm: float) -> float:
    """s = 2 z C (eq. P3): the noise on the sum of a fixed-size sample's clipped updates, whose
    replace-one sensitivity is 2C."""
    return 2.0 * noise_multiplier * clip_norm


def gaussian_like(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) of ``x``'s shape, in float64, from ``generator`` (reproducible per round)."""
    return torch.randn(x.shape, dtype=torch.float64, generator=generator) * std


def adaptive_clip_norm(
    clip_norm: float, unclipped_fraction: float, target_quantile: float, learning_rate: float
) -> float:
    """C' = C exp(-eta (b - gamma)) (eq. P4): the next round's clipping norm from this round's
    noisy fraction b of clients whose update was not clipped."""
    return clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


def sum_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """z_D = (z^-2 - z_b^-2)^(-1/2) (eq. P5): what is left for the sum of updates when the count
    of unclipped clients takes noise of standard deviation ``count_noise`` (z_b: the count's
    sensitivity is 1) out of the accountant's ``noise_multiplier`` z."""
    if count_noise <= noise_multiplier:
        raise ValueError(
            f"the count's noise ({count_noise:g}) must exceed the noise multiplier "
            f"({noise_multiplier:g}), or nothing is left for the updates"
        )
    if noise_multiplier == 0:  # no noise at all (tests): none to share
        return 0.0
    return (noise_multiplier**-2 - count_noise**-2) ** -0.5


#: t of eq. P6: an honest noisy reply exceeds its allowance with probability below exp(-32)
NOISE_TAIL = 8.0


def noise_norm_bound(std: float, numel: int) -> float:
    """s (sqrt(n) + t) (eq. P6): a length that N(0, s^2 I_n) exceeds with probability below
    exp(-t^2 / 2), t = :data:`NOISE_TAIL`."""
    return std * (math.sqrt(numel) + NOISE_TAIL) if std > 0 else 0.0
