"""Per-client (personalised) views of one evaluation of the global model (METHOD.md §10).

A client's own test distribution is the test split reweighted to the client's mix of the
partition key (its labels, or its groups where the partition skews groups): with q_c(k) the
share of key k in client c's training rows and m_i an example's metric,

    m_c = sum_k q_c(k) * mean_{i in test: key_i = k} m_i,

over the keys the test split has (q_c renormalised over them). It is exact for a partition that
skews only the key, as the Dirichlet and natural partitions do, costs no extra forward pass and
holds no client data back from training. A client whose keys are all missing from the test
split gets NaN.

Where an algorithm keeps a personal model per client (FLEX-MoE's own routers),
:func:`personal_models` evaluates each on the same view: the client's own distribution's
test data, for its own model rather than the global one.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from hfedmoe.data.tokenized import TokenizedDataset
from hfedmoe.model.state import swapped_in
from hfedmoe.training.evaluation import evaluate


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


def personal_models(
    model: nn.Module,
    test: TokenizedDataset,
    keys_N: np.ndarray,
    shares_CK: np.ndarray,
    personal: Mapping[int, dict[str, torch.Tensor]],
    batch_size: int,
    device: str = "cpu",
) -> dict[int, tuple[float, float]]:
    """m_c of accuracy and loss for each client c of ``personal``, with its personal model:
    ``model`` with the tensors ``personal[c]`` names replaced by its values.

    Each client runs on the test rows of the keys it holds (the others weigh nothing in m_c),
    one client at a time in ``model`` itself, whose own tensors are put back after each: the
    peak is the one model plus two copies of one client's replaced tensors (its values and the
    global ones saved), not a model per client. A client with no key in the test split: NaN."""
    out: dict[int, tuple[float, float]] = {}
    for client, weights in personal.items():
        shares_1K = shares_CK[client : client + 1]
        rows = np.flatnonzero(shares_1K[0][keys_N] > 0)
        if len(rows) == 0:
            out[client] = (float("nan"), float("nan"))
            continue
        with swapped_in(model, weights):
            result = evaluate(model, test.subset(rows), batch_size, device)
        acc = personalised(result.accuracy_N, keys_N[rows], shares_1K)[0]
        loss = personalised(result.loss_N, keys_N[rows], shares_1K)[0]
        out[client] = (float(acc), float(loss))
    return out
