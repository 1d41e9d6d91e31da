"""FFT-MoE's heterogeneity-aware load-balancing loss (METHOD.md §9b step 3), as pure functions.

Shape legend: N real (non-padding) tokens of one adapter layer, M experts of the adapter.

    L = L_task + lambda_c * M * sum_m f_m P_m                        (Switch's form)
    lambda_c = lambda * (1 + KL(P_c || uniform))                      (heterogeneity-aware)

f_m is the share of the layer's token slots routed to m (each token fills k(c) slots, so the
f_m sum to 1), P_m the mean router probability of m over the same tokens, and P_c the client's
mean routing distribution. The loss is M sum f_m P_m = 1 when routing is uniform and grows as
it concentrates; f is a count (no gradient), so the gradient flows through P into the router.
"""

from __future__ import annotations

import math

import torch


def slot_shares(chosen_NM: torch.Tensor) -> torch.Tensor:
    """f_m: the share of the token slots routed to each expert, (M,), summing to 1."""
    counts = chosen_NM.float().sum(0)
    return counts / counts.sum().clamp_min(1.0)


def balance_loss(probs_NM: torch.Tensor, chosen_NM: torch.Tensor) -> torch.Tensor:
    """M * sum_m f_m P_m for one layer (a scalar with the gradient of P)."""
    M = probs_NM.shape[-1]
    f_M = slot_shares(chosen_NM).to(probs_NM.dtype)
    return M * (f_M * probs_NM.mean(0)).sum()


def kl_from_uniform(p_M: torch.Tensor) -> float:
    """KL(p || uniform) = log M - H(p), in nats (0 for uniform routing, log M at most)."""
    p = p_M.double().clamp_min(0)
    p = p / p.sum()
    entropy = -float(torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum())
    return math.log(p.numel()) - entropy


def client_weight(lam: float, p_c_M: torch.Tensor | None) -> float:
    """lambda_c = lambda (1 + KL(P_c || uniform)); ``None`` (no heterogeneity term): lambda."""
    return lam if p_c_M is None else lam * (1.0 + kl_from_uniform(p_c_M))
