"""The ``cluster`` construction: specialised experts from a dense parent, in four steps.

An upcycled MoE starts with E identical experts and a near-uniform router, so every client uses
every expert alike (docs/SPECIALISATION.md). Pretrained MoEs are different: their routers send
different domains to different experts and their experts are not interchangeable. This module
makes such a model from the dense parent and a specialisation corpus (data no client sees),
combining three ideas from the literature:

1. **Domains** (:func:`kmeans_domains`): the corpus's documents are clustered into E domains
   by k-means on their mean-pooled final hidden states (unsupervised, as in cluster-aware
   upcycling and BTX's unsupervised branches).
2. **Data-seeded routers** (:func:`fit_router`): each MoE layer's router W (E, H) is fitted so
   that softmax(W x) predicts the domain of the document each token x comes from
   (multinomial logistic regression on the layer's FFN inputs; Nexus and cluster-aware
   upcycling seed router rows from domain centroids, we fit them, which also calibrates how
   sure the router is). Routing then follows the domain, so clients holding different
   domains use different experts.
3. **Drop-Upcycling** (:func:`drop_neurons_`, Nakamura et al., ICLR 2025): each expert copy
   gets a random share of its FFN neurons re-initialised (rows of the up/gate projections,
   columns of the down projection, drawn from each matrix's own mean and std), so experts no
   longer coincide.
4. **Distillation on routed tokens** (:func:`distil_experts_`): with the router fixed, the
   experts are trained so that the MoE block reproduces the dense FFN's output on the
   corpus's tokens. Each expert learns only the tokens routed to it: it recovers the dense
   function on its domain and stays poor elsewhere, which is what makes removing it cost its
   domain and not the others. Its loss is the squared error over the whole batch of tokens,
   normalised by the target's energy; no load-balancing term is needed, since the routers
   are fixed, and none is computed per micro-batch.

The steps are plain torch functions on tensors the builder (``hfedmoe.construction.prepare``)
captures; each is tested on hand-sized examples (tests/test_construction.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hfedmoe.model.moe import ExpertFFN, GatedExpertFFN, MoEFeedForward


def kmeans_domains(embeddings_SD: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """Step 1: each document's domain in 0..k-1, by k-means on L2-normalised embeddings."""
    x = nn.functional.normalize(embeddings_SD.double(), dim=-1).numpy()
    from sklearn.cluster import KMeans  # here: only a construction needs it (~70 MB RSS)

    return KMeans(k, n_init=4, random_state=seed).fit(x).labels_.astype(np.int64)


def fit_router(
    x_NH: torch.Tensor, domain_N: torch.Tensor, num_experts: int, steps: int, lr: float = 1e-2
) -> tuple[torch.Tensor, float]:
    """Step 2: router weights W (E, H) with softmax(W x) predicting each token's domain.

    Full-batch Adam on the cross-entropy (a router has no bias, so neither has the fit).
    Written with torch rather than scikit-learn's LogisticRegression: the fit is the router's
    own parameter in the router's own parametrisation, ten lines, and runs where the model
    runs. Returns W and the fraction of tokens whose top-1 expert is their domain.
    """
    x = x_NH.float()
    y = domain_N.long()
    weight_EH = torch.zeros(num_experts, x.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight_EH], lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(x @ weight_EH.T, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float(((x @ weight_EH.T).argmax(1) == y).float().mean())
    return weight_EH.detach(), accuracy


def _neuron_axes(expert: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """(tensor, axis) pairs that index the expert's intermediate neurons."""
    if isinstance(expert, ExpertFFN):
        into, out = [expert.fc_in], expert.fc_out
    elif isinstance(expert, GatedExpertFFN):
        into, out = [expert.gate_proj, expert.up_proj], expert.down_proj
    else:
        raise TypeError(f"cannot drop neurons of {type(expert).__name__}")
    pairs = [(linear.weight, 0) for linear in into] + [(out.weight, 1)]
    return pairs + [(linear.bias, 0) for linear in into if linear.bias is not None]


@torch.no_grad()
def drop_neurons_(expert: nn.Module, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Step 3: re-initialise ``round(fraction * I)`` random neurons of ``expert`` in place.

    A neuron is a row of the up (and gate) projection, its bias entry, and a column of the down
    projection; each is redrawn from a normal with its matrix's mean and std (Drop-Upcycling).
    Returns the indices of the re-initialised neurons.
    """
    pairs = _neuron_axes(expert)
    width = pairs[0][0].shape[pairs[0][1]]
    dropped = torch.randperm(width, generator=generator)[: round(fraction * width)]
    for tensor, axis in pairs:
        mean, std = float(tensor.mean()), float(tensor.std())
        shape = list(tensor.shape)
        shape[axis] = len(dropped)
        fresh = torch.randn(shape, generator=generator, dtype=tensor.dtype) * std + mean
        tensor.index_copy_(axis, dropped, fresh)
    return dropped


def relative_error(output_NH: torch.Tensor, target_NH: torch.Tensor) -> torch.Tensor:
    """Squared error over the whole batch, over the target's energy (0 = exact)."""
    return ((output_NH - target_NH) ** 2).sum() / (target_NH**2).sum().clamp_min(1e-12)


def distil_experts_(
    block: MoEFeedForward,
    x_NH: torch.Tensor,
    target_NH: torch.Tensor,
    steps: int,
    lr: float,
    tokens_per_step: int,
    generator: torch.Generator,
    on_step=None,
) -> None:
    """Step 4: train ``block``'s experts (router fixed) so that ``block(x) ≈ target``.

    Each step draws ``tokens_per_step`` tokens; Adam on :func:`relative_error`. ``on_step()``
    is called after every step (a progress bar).
    """
    params = [p for expert in block.experts for p in expert.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    router = block.gate.weight
    was_trainable = router.requires_grad
    router.requires_grad_(False)
    try:
        for _ in range(steps):
            pick = torch.randint(len(x_NH), (min(tokens_per_step, len(x_NH)),), generator=generator)
            loss = relative_error(block(x_NH[pick].unsqueeze(0))[0], target_NH[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step()
    finally:
        router.requires_grad_(was_trainable)
