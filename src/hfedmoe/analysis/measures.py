"""How specialised a model's experts are: small pure functions over routing statistics.

Shape legend: N tokens, E experts per layer, G groups (domains, labels or clients), C clients,
L MoE layers. Logarithms are natural except in the Jensen-Shannon divergence, which uses base 2
so that it lies in [0, 1].

- :func:`normalised_entropy`: mean per-token routing entropy over log E (1 = uniform router,
  0 = every token sure of one expert);
- :func:`load_cv`: coefficient of variation of the tokens each expert receives (0 = balanced);
- :func:`normalised_mutual_information`: I(group; expert) over the mean of the two entropies
  (scikit-learn's default "arithmetic" normalisation), from a contingency table of token
  assignments: 0 = expert choice says nothing of the group, 1 = it names it;
- :func:`group_shares`: each group's share of its tokens sent to each expert; uniform routing
  gives k/E everywhere;
- :func:`mean_pairwise_jsd`: the mean Jensen-Shannon divergence between clients' expert usage
  u_c (METHOD.md eq. (16)), averaged over layers and client pairs;
- :func:`removal_ratio`: how much more the loss rises when a group's most-used expert is
  removed than when a random one is.
"""

from __future__ import annotations

import itertools
import math

import torch


def normalised_entropy(probs_NE: torch.Tensor) -> float:
    """Mean over tokens of -sum_e p log p, divided by log E. (N, E) rows summing to 1."""
    E = probs_NE.shape[-1]
    p = probs_NE.double()
    per_token = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return float(per_token.mean() / math.log(E))


def load_cv(counts_E: torch.Tensor) -> float:
    """Standard deviation over mean (population std) of the tokens per expert."""
    c = counts_E.double()
    return float(c.std(unbiased=False) / c.mean()) if float(c.mean()) > 0 else 0.0


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def normalised_mutual_information(joint_GE: torch.Tensor) -> float:
    """NMI of group and expert from token-assignment counts (G, E); 0 where either is constant."""
    joint = joint_GE.double() / joint_GE.sum()
    p_G, p_E = joint.sum(1), joint.sum(0)
    h_G, h_E = _entropy(p_G), _entropy(p_E)
    if h_G == 0 or h_E == 0:
        return 0.0
    outer = p_G[:, None] * p_E[None, :]
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / outer[nz]).log()).sum())
    return mi / ((h_G + h_E) / 2)


def group_shares(joint_GE: torch.Tensor, tokens_G: torch.Tensor) -> torch.Tensor:
    """(G, E): the fraction of each group's tokens routed to each expert (rows sum to k)."""
    return joint_GE.double() / tokens_G.double().clamp_min(1)[:, None]


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> float:
    """JSD(p || q) in bits, of two distributions over the same support."""
    p, q = p.double() / p.sum(), q.double() / q.sum()
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> float:
        nz = a > 0
        return float((a[nz] * (a[nz] / m[nz]).log2()).sum())

    return (kl(p) + kl(q)) / 2


def mean_pairwise_jsd(u_CLE: torch.Tensor) -> float:
    """Mean over client pairs and layers of JSD(u_a(layer) || u_b(layer)); 0 for one client."""
    C, L, _ = u_CLE.shape
    pairs = list(itertools.combinations(range(C), 2))
    if not pairs:
        return 0.0
    total = sum(
        jensen_shannon(u_CLE[a, layer], u_CLE[b, layer]) for a, b in pairs for layer in range(L)
    )
    return total / (len(pairs) * L)


def removal_ratio(
    loss_full: float, loss_top: float, loss_random: float, tol: float = 1e-5
) -> float:
    """(loss without the most-used expert - loss) / (loss without a random expert - loss).

    A rise within ``tol`` x the loss is float noise and counts as none (copied experts differ
    only in the last bits). inf when removing a random expert does not raise the loss but
    removing the top one does; nan when neither does.
    """
    noise = tol * max(abs(loss_full), 1.0)
    top, rand = loss_top - loss_full, loss_random - loss_full
    top, rand = (0.0 if abs(x) <= noise else x for x in (top, rand))
    if rand <= 0:
        return math.inf if top > 0 else math.nan
    return top / rand
