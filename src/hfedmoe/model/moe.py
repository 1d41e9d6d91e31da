"""A top-k routed Mixture-of-Experts feed-forward block, laid out like transformers 5.x MoEs.

Shape legend: B batch, T tokens per sample, N = B*T tokens, H hidden size, I expert FFN size,
E experts, K experts per token (top-k).

As in Mixtral/Qwen-MoE, the block is a ``gate`` (a router module returning logits, top-k weights
and top-k indices) and ``experts``. Unlike them, each expert is a module of its own (a copy of
the dense FFN it was upcycled from, biases included), so an expert that receives no tokens gets
no gradient at all (``grad is None``) and a standard optimizer leaves it untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ExpertFFN(nn.Module):
    """One expert: the dense FFN it was upcycled from, ``fc_out(act(fc_in(x)))``."""

    def __init__(self, hidden: int, intermediate: int, act: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fc_in = nn.Linear(hidden, intermediate)
        self.act = act
        self.fc_out = nn.Linear(intermediate, hidden)

    def forward(self, x_NH: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x_NH)))


class TopKRouter(nn.Module):
    """eq. (1): G(x) = softmax(W x) over all E experts; each token keeps its top-k.

    The top-k weights are renormalised to sum to 1 (w_e = G_e / sum_{top-k} G), as in Mixtral,
    so that an upcycled model with identical experts equals its dense parent for any k and any
    expert subset. Returns ``(logits_NE, weights_NK, indices_NK)`` like transformers' routers.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.norm_topk_prob = True
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))

    def forward(self, x_NH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_NE = nn.functional.linear(x_NH, self.weight)
        probs_NE = torch.softmax(logits_NE, dim=-1, dtype=torch.float32)
        weights_NK, indices_NK = torch.topk(probs_NE, self.top_k, dim=-1)
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        return logits_NE, weights_NK, indices_NK


class MoEFeedForward(nn.Module):
    """Router + E experts. eq. (2): y = sum_{e in top-k(x)} w_e(x) E_e(x)."""

    def __init__(self, experts: list[nn.Module], hidden: int, top_k: int):
        super().__init__()
        self.num_experts = len(experts)
        self.top_k = top_k
        self.gate = TopKRouter(hidden, self.num_experts, top_k)
        self.experts = nn.ModuleList(experts)

    def forward(self, hidden_BTH: torch.Tensor) -> torch.Tensor:
        shape = hidden_BTH.shape
        x_NH = hidden_BTH.reshape(-1, shape[-1])
        _, weights_NK, idx_NK = self.gate(x_NH)
        weights_NK = weights_NK.to(x_NH.dtype)
        out_NH = torch.zeros_like(x_NH)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx_NK == e)
            if token.numel() == 0:
                continue
            out_NH.index_add_(0, token, expert(x_NH[token]) * weights_NK[token, slot, None])
        return out_NH.reshape(shape)
