"""Per-client (personalised) views of one evaluation of the global model (METHOD.md §10).

A client's own test distribution is the test split reweighted to the client's mix of the
partition key (its labels, or its groups where the partition skews groups): with q_c(k) the
share of key k in client c's training rows and m_i an example's metric,

    m_c = sum_k q_c(k) * mean_{i in test: key_i = k} m_i,

over the keys the test split has (q_c renormalised over them). It is exact for a partition that
skews only the key, as the Dirichlet and natural partitions do, costs no extra forward pass and
holds no client data back from training. A client whose keys are all missing from the test
split gets NaN.
"""

from __future__ import annotations

import numpy as np


def key_shares(parts: list[np.ndarray], keys: np.ndarray, num_keys: int) -> np.ndarray:
    """q_c(k): each client's share of each key, (C, K), from its rows ``parts[c]``."""
    counts_CK = np.stack([np.bincount(keys[rows], minlength=num_keys) for rows in parts])
    return counts_CK / np.maximum(counts_CK.sum(1, keepdims=True), 1)


def personalised(values_N: np.ndarray, keys_N: np.ndarray, shares_CK: np.ndarray) -> np.ndarray:
    """m_c for every client (C,): ``values_N`` per test example, ``keys_N`` their keys."""
    K = shares_CK.shape[1]
    count_K = np.bincount(keys_N, minlength=K).astype(np.float64)
    mean_K = np.bincount(keys_N, weights=values_N, minlength=K) / np.maximum(count_K, 1)
    present_K = count_K > 0
    weight_CK = shares_CK * present_K
    mass_C = weight_CK.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mass_C > 0, (weight_CK * mean_K).sum(1) / mass_C, np.nan)
