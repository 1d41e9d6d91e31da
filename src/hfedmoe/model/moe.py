"""A top-k routed Mixture-of-Experts feed-forward block.

Shape legend: B batch, T tokens per sample, N = B*T tokens, H hidden size, I expert FFN size,
E experts, K experts per token (top-k).

The reference path loops over experts and gathers the tokens routed to each, as Hugging Face's
Mixtral/Qwen-MoE code does; each expert is a module of its own, so an expert that receives no
tokens gets no gradient (``grad is None``) and a standard optimizer leaves it untouched.
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


class MoEFeedForward(nn.Module):
    """Router + E experts; each token goes to its top-k experts.

    eq. (1)-(2): G(x) = softmax(router(x)) over all E experts, y = sum_{e in top-k} w_e E_e(x).
    The top-k weights are renormalised to sum to 1 (w_e = G_e / sum_{top-k} G), as in Mixtral
    and Qwen-MoE, so that an upcycled model with identical experts equals its dense parent for
    any k and any expert subset.

    After each forward, ``router_probs`` holds the full softmax (N, E) and ``topk_idx`` the
    routing decisions (N, K), detached, for the algorithms' importance statistics.
    """

    def __init__(self, experts: list[ExpertFFN], hidden: int, top_k: int):
        super().__init__()
        self.num_experts = len(experts)
        self.top_k = top_k
        self.router = nn.Linear(hidden, self.num_experts, bias=False)
        self.experts = nn.ModuleList(experts)
        self.router_probs: torch.Tensor | None = None
        self.topk_idx: torch.Tensor | None = None

    def forward(self, hidden_BTH: torch.Tensor) -> torch.Tensor:
        shape = hidden_BTH.shape
        x_NH = hidden_BTH.reshape(-1, shape[-1])
        probs_NE = torch.softmax(self.router(x_NH), dim=-1, dtype=torch.float32)
        weights_NK, idx_NK = torch.topk(probs_NE, self.top_k, dim=-1)
        weights_NK = (weights_NK / weights_NK.sum(dim=-1, keepdim=True)).to(x_NH.dtype)
        self.router_probs, self.topk_idx = probs_NE.detach(), idx_NK.detach()

        out_NH = torch.zeros_like(x_NH)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx_NK == e)
            if token.numel() == 0:
                continue
            y = expert(x_NH[token]) * weights_NK[token, slot, None]
            out_NH.index_add_(0, token, y)
        return out_NH.reshape(shape)
