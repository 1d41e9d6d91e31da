"""HFedMoE's server-side maths: sparsity-aware aggregation of experts and routers.

METHOD.md §4 (paper §III-E). Pure functions over tensors; equation numbers are the paper's.
Shape legend: C clients (in a fixed order), L MoE layers, E experts per layer.

Inputs per client c: |D_c| (examples), u_c(e) (usage, eq. (16)), s_c(e) (importance averaged
over its batches) and, optionally, how many local batches updated each expert.
"""

from __future__ import annotations

import torch


def usage(gate_sum_LE: torch.Tensor, num_samples: int) -> torch.Tensor:
    """eq. (16): u_c(e) = (1/|D_c|) sum_{x in D_c} G_e(x), from the running sum of G_e(x)."""
    return gate_sum_LE / max(num_samples, 1)


def dominant(u_CLE: torch.Tensor, tau: float) -> torch.Tensor:
    """S_c = {e : u_c(e) >= tau}, the experts client c really uses. (C, L, E) bool."""
    return u_CLE >= tau


def qualifies(
    u_CLE: torch.Tensor, tau: float, updates_CLE: torch.Tensor | None = None
) -> torch.Tensor:
    """Who counts for expert e in eq. (17): u_c(e) >= tau, and (METHOD.md §7 default) the
    expert was updated in at least one local batch; ``updates_CLE=None``: usage alone."""
    q = dominant(u_CLE, tau)
    return q if updates_CLE is None else q & (updates_CLE > 0)


def expert_weights(num_examples_C: torch.Tensor, qualifies_CLE: torch.Tensor) -> torch.Tensor:
    """eq. (17): w_c(e) = |D_c| 1[c qualifies for e] / sum_j |D_j| 1[j qualifies for e].

    (C, L, E), summing to 1 over clients for every expert someone qualifies for, and to 0 for
    an expert nobody qualifies for (the caller keeps its previous global value).
    """
    mass_CLE = num_examples_C.to(torch.float64).view(-1, 1, 1) * qualifies_CLE
    total_LE = mass_CLE.sum(0, keepdim=True)
    return torch.where(total_LE > 0, mass_CLE / total_LE.clamp_min(1e-300), 0.0)


def routing_consistency(S_CLE: torch.Tensor) -> torch.Tensor:
    """eq. (18): r(c) = |S_c n S_global| / |S_global| over all (layer, expert) pairs. (C,).

    Reported only; it does not enter the weights (METHOD.md §4)."""
    S_global = S_CLE.any(0)
    n = int(S_global.sum())
    return (S_CLE & S_global).flatten(1).sum(1) / n if n else torch.zeros(S_CLE.shape[0])


def router_mass(
    u_LE: torch.Tensor, s_LE: torch.Tensor, tau: float, scope: str = "per_layer"
) -> torch.Tensor:
    """eq. (19) summed over S_c: sum_{e in S_c} u_c(e) s_c(e), one client, for each layer's
    router. (L,).

    ``scope`` (METHOD.md §7): "per_layer" (the default) takes S_c within each MoE layer, so each
    layer's router gets its own client weights; "all_layers" (the text's reading) takes S_c
    over every (layer, expert) pair, one mass per client, the same for every layer's router.

    alpha(c) of eq. (20) is this over |S_global| (:func:`global_dominant`, of the same scope),
    the same for every client of the round; so normalised alphas are these masses over their
    sum, and a server can fold one client at a time (``mechanics.merging``)."""
    S_LE = dominant(u_LE, tau)
    mass_L = torch.where(S_LE, u_LE * s_LE, 0.0).to(torch.float64).sum(-1)
    return mass_L if scope == "per_layer" else mass_L.sum().expand_as(mass_L).clone()


def router_weights(
    u_CLE: torch.Tensor,
    s_CLE: torch.Tensor,
    tau: float,
    normalize: bool = True,
    scope: str = "per_layer",
) -> torch.Tensor:
    """eqs. (19)-(20): alpha(c) for the router of each layer. (C, L).

    p_c(e) = u_c(e) s_c(e) on S_c (eq. (19)); alpha(c) = sum_{e in S_c} p_c(e) / |S_global|
    (eq. (20)), with S_c and S_global taken within the layer whose router is aggregated
    (``scope="per_layer"``, METHOD.md §7 default) or over all layers (``"all_layers"``: one
    alpha(c) per client for every layer). ``normalize`` (METHOD.md §7 default) rescales each
    layer's alphas to sum to 1, so eq. (21) is a convex combination; a layer where no client
    has a dominant expert (in its scope) gets all zeros (the caller keeps its previous router).
    """
    mass_CL = torch.stack(
        [router_mass(u, s, tau, scope) for u, s in zip(u_CLE, s_CLE, strict=True)]
    )
    if normalize:
        total_L = mass_CL.sum(0, keepdim=True)
        return torch.where(total_L > 0, mass_CL / total_L.clamp_min(1e-300), 0.0)
    return mass_CL / global_dominant(dominant(u_CLE, tau), scope)


def global_dominant(S_CLE: torch.Tensor, scope: str = "per_layer") -> torch.Tensor:
    """|S_global| for each layer's router, at least 1 (eq. (20)'s divisor). (L,) float64.

    "per_layer": the layer's own; "all_layers": over every (layer, expert) pair, repeated."""
    n_L = S_CLE.any(0).sum(-1)
    if scope != "per_layer":
        n_L = n_L.sum().expand_as(n_L)
    return n_L.clamp_min(1).to(torch.float64)


def combine(tensors_C: list[torch.Tensor], weights_C: torch.Tensor) -> torch.Tensor:
    """sum_c w_c x_c in float64, cast back (eq. (17) per expert, eq. (21) per router)."""
    acc = torch.zeros(tensors_C[0].shape, dtype=torch.float64)
    for x, w in zip(tensors_C, weights_C.tolist(), strict=True):
        if w:
            acc += x.to(torch.float64) * w
    return acc.to(tensors_C[0].dtype)
