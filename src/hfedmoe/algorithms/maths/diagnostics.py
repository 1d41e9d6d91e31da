"""Measurements of *why* HFedMoE differs from its simpler neighbours, as pure
functions; the algorithm records them, they change nothing it computes.

Shape legend: L MoE layers, E experts per layer, C clients of a round.
"""

from __future__ import annotations

import torch


def usage_overlap(u_LE: torch.Tensor, updated_LE: torch.Tensor) -> float:
    """How far the experts a client updated (the union of its E_active, eq. (15)) are the ones
    it uses most: with m experts updated, the share of them among its m most-used by u_c,
    eq. (16). 1: selection hit exactly its most-used experts; NaN if it updated none."""
    updated = updated_LE.flatten() > 0
    m = int(updated.sum())
    if m == 0:
        return float("nan")
    top = torch.zeros_like(updated)
    top[torch.topk(u_LE.flatten().to(torch.float64), m).indices] = True
    return float((top & updated).sum()) / m


def excluded_updates(qualifies_LE: torch.Tensor, updated_LE: torch.Tensor) -> tuple[int, int]:
    """One client's expert updates that eq. (17) leaves out (updated, but not used above tau)
    and all its expert updates, which holder averaging would all count."""
    held = updated_LE > 0
    return int((held & ~qualifies_LE).sum()), int(held.sum())


def weight_distance(mass_C: torch.Tensor, reference_C: torch.Tensor) -> float:
    """Total variation distance between two weightings of the same clients (each normalised
    to sum to 1): 0 when eqs. (19)-(21) weigh a router's clients as FedAvg's |D_c| does, 1 when
    they share no weight. NaN when either sums to 0 (no client counts)."""
    a, b = mass_C.to(torch.float64), reference_C.to(torch.float64)
    if a.sum() <= 0 or b.sum() <= 0:
        return float("nan")
    return float(0.5 * (a / a.sum() - b / b.sum()).abs().sum())
