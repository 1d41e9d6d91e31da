"""Routing statistics of a model over a data set, and its loss with experts removed.

One eval-mode pass over the data through the expert interface's routing capture collects, per
MoE layer: the summed normalised token entropy, the tokens each expert receives (top-k
assignments), the same split by a per-sample group id, and each sample's mean router
probabilities G_e(x) (what METHOD.md eq. (16) averages into u_c). Memory: (L, S, E) floats for
S samples, plus (L, G, E) counts.

Removing an expert means routing as strict mode does among the other experts
(``ExpertModel.restrict_routing``): the router's own scores, with that expert never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from hfedmoe.analysis.measures import normalised_entropy
from hfedmoe.data.tokenized import TokenizedDataset, sequential_batches
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.prefix import BlockPrefix
from hfedmoe.model.routing import lean_forward
from hfedmoe.training import evaluate


@dataclass
class RoutingStats:
    """What one pass over a data set shows of the routing, per MoE layer."""

    top_k: list[int]  # (L,) experts per token
    entropy_sum_L: torch.Tensor  # (L,) sum over tokens of the normalised entropy
    tokens: int  # real tokens seen
    load_LE: torch.Tensor  # (L, E) token assignments per expert
    joint_LGE: torch.Tensor  # (L, G, E) token assignments per group and expert
    tokens_G: torch.Tensor  # (G,) real tokens per group
    gates_LSE: torch.Tensor  # (L, S, E) each sample's mean router probabilities

    @property
    def entropy_L(self) -> torch.Tensor:
        """Mean normalised routing entropy per layer."""
        return self.entropy_sum_L / max(self.tokens, 1)

    def usage(self, samples: np.ndarray | None = None) -> torch.Tensor:
        """u(e) over ``samples`` (default all): the mean of G_e(x), eq. (16). (L, E)"""
        gates = self.gates_LSE if samples is None else self.gates_LSE[:, samples]
        return gates.mean(1)


@torch.no_grad()
def collect_routing(
    model: nn.Module,
    data: TokenizedDataset,
    groups_S: np.ndarray,
    num_groups: int,
    batch_size: int,
) -> RoutingStats:
    """One pass over ``data`` (eval mode, CPU); ``groups_S``: each sample's group id."""
    em = ExpertModel(model)
    model.eval()
    L, E = em.shape
    entropy_L = torch.zeros(L, dtype=torch.float64)
    load_LE = torch.zeros(L, E, dtype=torch.float64)
    joint_LGE = torch.zeros(L, num_groups, E, dtype=torch.float64)
    tokens_G = torch.zeros(num_groups, dtype=torch.float64)
    gates, tokens = [], 0
    lean = lean_forward(model)  # the routers are read, the logits are not
    for idx in sequential_batches(len(data), batch_size):
        batch = data.inputs(idx)
        with em.capture() as capture:
            model(**batch, **lean)
        group_B = torch.as_tensor(groups_S[idx], dtype=torch.long)
        for layer, (probs_NE, chosen_NE, sample_N) in enumerate(
            capture.tokens(batch["attention_mask"])
        ):
            entropy_L[layer] += normalised_entropy(probs_NE) * len(probs_NE)
            load_LE[layer] += chosen_NE.double().sum(0)
            joint_LGE[layer].index_add_(0, group_B[sample_N], chosen_NE.double())
            if layer == 0:
                tokens += len(sample_N)
                tokens_G.index_add_(0, group_B[sample_N], torch.ones(len(sample_N)).double())
        gates.append(capture.sample_probs(batch["attention_mask"]))
    return RoutingStats(
        top_k=[layer.top_k for layer in em.layers],
        entropy_sum_L=entropy_L,
        tokens=tokens,
        load_LE=load_LE,
        joint_LGE=joint_LGE,
        tokens_G=tokens_G,
        gates_LSE=torch.cat(gates, dim=1),
    )


def removal_mask(shape: tuple[int, int], removed_L: list[int]) -> torch.Tensor:
    """(L, E) bool: expert ``removed_L[l]`` of each MoE layer l."""
    removed_LE = torch.zeros(shape, dtype=torch.bool)
    removed_LE[torch.arange(len(removed_L)), torch.as_tensor(removed_L)] = True
    return removed_LE


def losses_without(
    model: nn.Module, data: TokenizedDataset, removals: list[torch.Tensor], batch_size: int
) -> list[float]:
    """The loss on ``data`` as the model is, then without each removal's (L, E) experts. The
    blocks before the first MoE block run in the first pass only (:class:`BlockPrefix`)."""
    prefix = BlockPrefix(model)
    with prefix.recording():
        losses = [loss_with(model, data, None, batch_size)]
    for removed_LE in removals:
        with prefix.replaying():
            losses.append(loss_with(model, data, ~removed_LE, batch_size))
    return losses


def loss_with(
    model: nn.Module, data: TokenizedDataset, allowed_LE: torch.Tensor | None, batch_size: int
) -> float:
    """The loss of ``model`` on ``data`` when tokens may be routed only to the experts
    ``allowed_LE`` marks (None: every expert)."""
    # only the loss: multiple choice is scored on the right answers' tokens alone, without
    # scoring every other choice too (the same number, a fraction of the passes)
    data = replace(data, choices=None)
    if allowed_LE is None:
        return evaluate(model, data, batch_size).loss
    with ExpertModel(model).restrict_routing(allowed_LE):
        return evaluate(model, data, batch_size).loss
