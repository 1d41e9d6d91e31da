"""How far local training can move a group of weights, and how much of a group's aggregate one
client may carry: the bounds the server holds every client to (``mechanics.validation``,
``mechanics.merging``). Pure functions over numbers.

**Update bound.** A client trains with AdamW (``hfedmoe.training.optimizer``) at a learning rate
``lr``, weight decay ``wd`` and ``T`` optimizer steps that the server itself sets. One AdamW step
moves a coordinate by ``lr (m_hat / (sqrt(v_hat) + eps) + wd w)``; by Cauchy-Schwarz over the
moments' exponential weights, ``|m_hat| <= rho_t sqrt(v_hat)`` whatever the gradients were
(:func:`adamw_ratio_bound`: rho_1 = 1, rho_5 = 1.011, rho_20 = 1.156 for betas (0.9, 0.999)).
So after T steps,
elementwise ``|w_T - w_0| <= lr sum_t rho_t + (1 - (1 - lr wd)^T) |w_0|``, and over a group of n
coordinates (:func:`adamw_update_bound`)::

    ||w_T - w_0|| <= lr sqrt(n) sum_{t<=T} rho_t + (1 - (1 - lr wd)^T) ||w_0||

Each step also rounds every weight to its dtype, by at most u |w| (u the unit roundoff, 2^-24
for float32): T u (||w_0|| + the rest) more. An honest client never exceeds the sum, in any
round, with any data: it needs no calibration (round 1 is bounded like every other) and no
history that attackers could poison. A sign flip of the
weights (2 ||w||), Gaussian noise at the weights' own scale (about ||w||) or an update scaled by
10 exceed it by far. An expert moved in fewer than T steps is held to the same T-step bound.

With differential privacy, each client's update is also clipped to a norm C that sets the
sensitivity. The two compose in that order: a group beyond this bound is proof of a faulty or
hostile client, so its reply is rejected (or the group pulled back to the bound) first; the
accepted update is then clipped to C, which is chosen far below this bound and so is what
binds for honest clients. A rejected client contributes nothing, a case add/remove neighbouring
in client-level DP already covers.

**Share cap.** :func:`capped_mass` is the mass a client may keep so that its share of a
weighted mean stays at a cap (``mechanics.merging`` applies it).

**Descent check.** A sign-flipped update ``w - delta`` is exactly as large as the honest
``w + delta``, so no bound on size can tell them apart; a direction can, against a reference
the client does not control. The server's is the gradient ``g`` of its validation loss at the
round's global weights ``w``: to first order an update ``delta`` changes that loss by
``<delta, g>``, so an update with ``cos(delta, -g) < 0`` (:func:`descent_cosine`) makes the
server's model worse on data no client holds, and negating an honest update that helps makes
one that hurts. It is a check on each reply alone, so it fits the one-reply-at-a-time fold
(Zeno++, Xie et al. 2020, scores asynchronous updates the same way). It costs honest clients
whose skewed data pulls the model away from the validation mix; docs/RESULTS.md measures it.
"""

from __future__ import annotations

import math

#: torch's AdamW defaults, which ``hfedmoe.training.optimizer`` uses
ADAMW_BETAS = (0.9, 0.999)

#: relative slack on the update bound for the rounding of the step itself (lr m / sqrt(v))
ROUNDING = 1e-3

#: the unit roundoff of float32, the weights' dtype while training
FLOAT32_ROUNDOFF = 2.0**-24


def adamw_ratio_bound(step: int, betas: tuple[float, float] = ADAMW_BETAS) -> float:
    """rho_t, the largest |m_hat_t| / sqrt(v_hat_t) any gradient sequence can give at ``step``.

    m_hat_t = sum_i a_i g_i and v_hat_t = sum_i b_i g_i^2 with a_i = (1 - b1) b1^(t-i) /
    (1 - b1^t) and b_i = (1 - b2) b2^(t-i) / (1 - b2^t), so by Cauchy-Schwarz
    |m_hat_t| <= sqrt(sum_i a_i^2 / b_i) sqrt(v_hat_t), with equality for g_i proportional to
    a_i / b_i: the bound is tight.
    """
    b1, b2 = betas
    bias1, bias2 = 1 - b1**step, 1 - b2**step
    total = 0.0
    for age in range(step):  # age = t - i
        a = (1 - b1) * b1**age / bias1
        b = (1 - b2) * b2**age / bias2
        total += a * a / b
    return math.sqrt(total)


def adamw_update_bound(
    lr: float,
    weight_decay: float,
    steps: int,
    numel: int,
    weight_norm: float,
    betas: tuple[float, float] = ADAMW_BETAS,
    roundoff: float = FLOAT32_ROUNDOFF,
) -> float:
    """The most ``steps`` AdamW steps can move ``numel`` coordinates whose norm is
    ``weight_norm`` (the module docstring's bound, with :data:`ROUNDING` slack; ``roundoff``:
    the unit roundoff of the weights' dtype)."""
    adam = lr * math.sqrt(numel) * sum(adamw_ratio_bound(t, betas) for t in range(1, steps + 1))
    decay = 1 - (1 - lr * weight_decay) ** steps
    moved = adam + decay * weight_norm
    return (moved + steps * roundoff * (weight_norm + moved)) * (1 + ROUNDING)


def capped_mass(mass: float, others: float, share: float) -> float:
    """The mass a client keeps so that its share of a weighted mean is at most ``share``:
    m' = min(m, share x others / (1 - share)), so m' / (m' + others) <= share; ``others`` is
    the other clients' total. A sole contributor (others = 0) or a share of 1 keeps its mass."""
    if others <= 0 or share >= 1:
        return mass
    return min(mass, share * others / (1 - share))


def descent_cosine(dot: float, delta_norm: float, gradient_norm: float) -> float:
    """cos(delta, -g) = -<delta, g> / (||delta|| ||g||) from ``dot`` = <delta, g> and the two
    norms; 0 where either norm is 0 (an update that moves nothing points nowhere). A
    non-finite term is not a direction: NaN, which every threshold rejects."""
    if not all(math.isfinite(x) for x in (dot, delta_norm, gradient_norm)):
        return math.nan
    if delta_norm == 0 or gradient_norm == 0:
        return 0.0
    return max(-1.0, min(1.0, -dot / (delta_norm * gradient_norm)))
