"""FLUX's arithmetic (METHOD.md §9a; Chen et al., arXiv 2508.19078), as pure functions with the
step and equation numbers of METHOD.md §9a.

Shape legend: L MoE layers, E experts per layer; ``_E`` one layer's experts.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch


def utility(routed_samples_E: torch.Tensor, grad_sq_sum_E: torch.Tensor) -> torch.Tensor:
    """Step 2, FLUX's eq. (3) (Oort-style): u(e) = |D^e| sqrt((1/|D^e|) sum_{k in D^e} g_k),
    from |D^e| and the running sum of the samples' squared gradient norms g_k; 0 where no
    sample reached e."""
    n = routed_samples_E.double()
    mean = grad_sq_sum_E.double() / n.clamp_min(1.0)
    return torch.where(n > 0, n * mean.clamp_min(0.0).sqrt(), torch.zeros_like(n))


def spsa_squared_norm(loss_plus: float, loss_minus: float, sigma: float) -> float:
    """Step 3's zeroth-order estimate of ||grad||² from one two-sided probe along z ~ N(0, I):
    ((L(w + sigma z) - L(w - sigma z)) / (2 sigma))², an unbiased estimate of (z . grad)²,
    whose mean over z is ||grad||²."""
    return ((loss_plus - loss_minus) / (2.0 * sigma)) ** 2


def exploit_share(server_round: int, rounds: int, eps_0: float, eps_max: float) -> float:
    """Step 3: epsilon_t = min(eps_max, eps_0 + delta t), t = round - 1, growing linearly to
    eps_max at half the rounds."""
    t = server_round - 1
    half = max(rounds / 2.0, 1.0)
    return min(eps_max, eps_0 + (eps_max - eps_0) * t / half)


def role_sizes(b_tune: int, eps: float, pool: int) -> tuple[int, int]:
    """Step 3's |E_i| = ``b_tune`` within [1, pool] and how many of E_i are exploit experts:
    max(1, round(eps |E_i|)), at most |E_i|."""
    b_tune = min(max(b_tune, 1), pool)
    return b_tune, min(b_tune, max(1, round(eps * b_tune)))


def assign_roles(
    utility_X: torch.Tensor, b_tune: int, eps: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3, FLUX's eq. (4): E_i = the top-``b_tune`` experts by utility (X = L*E, flat); its
    best max(1, round(eps |E_i|)) are *exploit* experts (trained); the other |E_i| - that many
    are *explore* experts, drawn at random from the pool outside E_i (forward-only). Returns
    (exploit_X, explore_X) bool masks, disjoint, b_tune experts together."""
    X = utility_X.numel()
    b_tune, n_exploit = role_sizes(b_tune, eps, X)
    order = torch.argsort(utility_X.double(), descending=True, stable=True)
    exploit = torch.zeros(X, dtype=torch.bool)
    exploit[order[:n_exploit]] = True
    rest = order[b_tune:] if b_tune < X else order[n_exploit:]  # outside E_i, if any
    if len(rest) < b_tune - n_exploit:  # a pool too small: any non-exploit expert
        rest = order[n_exploit:]
    picked = rng.choice(len(rest), size=b_tune - n_exploit, replace=False)
    explore = torch.zeros(X, dtype=torch.bool)
    explore[rest[torch.from_numpy(np.sort(picked))]] = True
    return exploit, explore


def merge_budget(frequency_LE: torch.Tensor, b_non: int) -> list[int]:
    """Step 4, FLUX's eq. (1): b_l = (L - l + 1) / (v_l + 1e-8), l = 1 the shallowest MoE layer
    and v_l the variance of layer l's activation frequencies; B_non(l) = max(1, floor(b_l /
    sum_k b_k * B_non)): shallow layers and layers whose experts are used evenly keep more."""
    L = frequency_LE.shape[0]
    v_L = frequency_LE.double().var(dim=1, unbiased=False)
    b_L = torch.arange(L, 0, -1, dtype=torch.float64) / (v_L + 1e-8)
    share_L = b_L / b_L.sum()
    return [max(1, math.floor(float(s) * b_non)) for s in share_L]


def merge_weights(frequency_E: torch.Tensor, attention_E: torch.Tensor) -> torch.Tensor:
    """Step 6, FLUX's eq. (2): alpha_e / sum alpha, alpha_e = f_e * a_e over one cluster's
    experts; equal weights if every alpha is 0 (no token reached the cluster)."""
    alpha = frequency_E.double() * attention_E.double()
    total = float(alpha.sum())
    if total <= 0:
        return torch.full_like(alpha, 1.0 / alpha.numel())
    return alpha / total


def cluster_experts(
    weights_XP: torch.Tensor, k: int, components: int = 32, iterations: int = 20, seed: int = 0
) -> list[int]:
    """Step 5: the cluster of each of X experts (one layer's non-tuned ones, flattened weights
    (X, P)) among ``k``: k-means with cosine distance (k-means++ init, ``iterations``
    iterations) on a PCA of the weights to ``components`` dimensions. k >= X: each its own.

    Cosine k-means is k-means on the L2-normalised PCA coordinates (spherical k-means); sklearn
    has no cosine k-means, and on unit vectors squared distance is 2 - 2 cos."""
    X = weights_XP.shape[0]
    if k >= X:
        return list(range(X))
    if k <= 1:
        return [0] * X
    from sklearn.cluster import KMeans  # imported here: sklearn costs ~60 MB of RSS per process
    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning

    x = weights_XP.double().numpy()
    if np.ptp(x, axis=0).max() == 0:  # identical experts (upcycled): any grouping merges alike
        return [i % k for i in range(X)]
    n = min(components, X, x.shape[1])
    z = PCA(n_components=n, random_state=seed).fit_transform(x)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=iterations, random_state=seed)
    with warnings.catch_warnings():  # duplicate experts leave fewer distinct clusters: fine
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = km.fit_predict(z)
    # renumber in order of first appearance, so that the labels do not depend on sklearn's
    first = {int(c): i for i, c in enumerate(dict.fromkeys(labels.tolist()))}
    return [first[int(c)] for c in labels]
