"""HFedMoE's client-side maths: expert importance and information-bottleneck selection.

METHOD.md §2-§3 (paper §III-C, §III-D). Pure functions over tensors; equation numbers are the
paper's. Shape legend: L MoE layers, B samples in the batch, E experts per layer.

``G_LBE`` is the per-sample router probability G_e(x_i) of every (layer, expert): the softmax
over all experts of a layer, reduced over the sample's real tokens (METHOD.md §7), as
:meth:`hfedmoe.model.ExpertModel.capture` returns it.
"""

from __future__ import annotations

from typing import Literal

import torch

_EPS = 1e-12  # keeps log(0 / 0) finite for an expert no sample gives probability to


def cumulative_importance(G_LBE: torch.Tensor) -> torch.Tensor:
    """eq. (3): s_cumul(e) = (1/B) sum_i G_e(x_i), broad usefulness. (L, E)."""
    return G_LBE.mean(dim=1)


def specific_importance(G_LBE: torch.Tensor) -> torch.Tensor:
    """eq. (4): s_spec(e) = max_i G_e(x_i), rare but decisive experts. (L, E)."""
    return G_LBE.amax(dim=1)


def batch_importance(G_LBE: torch.Tensor, lam: float) -> torch.Tensor:
    """eq. (5): s_b(e) = lambda s_cumul(e) + (1 - lambda) s_spec(e). (L, E)."""
    return lam * cumulative_importance(G_LBE) + (1 - lam) * specific_importance(G_LBE)


def activation_kl(G_LBE: torch.Tensor) -> torch.Tensor:
    """eqs. (10)-(11): KL_e = (1/B) sum_i G_e(x_i) log(G_e(x_i) / p(z_e)), (L, E),

    with the marginal p(z_e) = (1/B) sum_j G_e(x_j) (eq. (10)). Experts whose gate swings from
    sample to sample get a larger KL; an expert with the same gate for every sample gets 0.
    """
    p_LE = G_LBE.mean(dim=1, keepdim=True)
    return (G_LBE * torch.log((G_LBE + _EPS) / (p_LE + _EPS))).mean(dim=1)


def ib_score(G_LBE: torch.Tensor, lam: float, beta: float) -> torch.Tensor:
    """eq. (14): I_b(e) = s_b(e) - beta KL_e. (L, E)."""
    return batch_importance(G_LBE, lam) - beta * activation_kl(G_LBE)


def select_active(
    score_LE: torch.Tensor,
    routed_LE: torch.Tensor,
    budget: int,
    scope: Literal["global", "per_layer"] = "global",
) -> torch.Tensor:
    """eq. (15): E_active = the top-C_budget experts of E_union by score. (L, E) bool.

    ``routed_LE`` is E_union (experts the batch was routed to). Since the objective is additive
    the best subset of size <= budget is the top-``budget`` by score. ``scope="global"`` ranks
    all (layer, expert) pairs together (METHOD.md §7 default); ``"per_layer"`` gives each layer
    an equal share (budget // L, the remainder to the first layers). Ties break by position.
    """
    routed_LE = routed_LE.bool()
    L, E = routed_LE.shape
    if budget <= 0:
        return torch.zeros_like(routed_LE)
    if scope == "global":
        return _top_k_mask(score_LE.reshape(-1), routed_LE.reshape(-1), budget).reshape(L, E)
    shares = [budget // L + (1 if layer < budget % L else 0) for layer in range(L)]
    return torch.stack(
        [_top_k_mask(score_LE[layer], routed_LE[layer], shares[layer]) for layer in range(L)]
    )


def _top_k_mask(score: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, int(allowed.sum()))
    out = torch.zeros_like(allowed)
    if k > 0:
        masked = score.masked_fill(~allowed, float("-inf"))
        # a stable sort makes ties break by position, so selection is deterministic
        order = torch.sort(masked, descending=True, stable=True).indices
        out[order[:k]] = True
    return out
