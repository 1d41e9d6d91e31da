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


class _ExpertLinear(torch.autograd.Function):
    """``x W^T + b`` whose weight gradient is skipped if its expert is frozen *at backward time*.

    HFedMoE picks the experts to update from the router scores of the whole forward pass
    (METHOD.md §3, eq. (15)), so the choice is known only after the forward pass, when autograd
    has already recorded which weights need gradients. This function reads ``owner.trainable``
    when the backward pass reaches it: a frozen expert still passes gradients on to its input
    (earlier layers need them) but skips the two weight-gradient products, so the backward pass
    shrinks with the fraction of experts updated, and its ``grad`` stays None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, owner):
        ctx.save_for_backward(x, weight)
        ctx.owner, ctx.has_bias = owner, bias is not None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        # under autocast (train.precision = "bf16") the forward ran in bf16 while x or the
        # weight were saved as they came: compute in the gradient's dtype, and give each
        # gradient its tensor's dtype (in fp32 every cast is a no-op)
        dtype = grad_y.dtype
        grad_x = (grad_y @ weight.to(dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.owner.trainable:
            g_NO = grad_y.reshape(-1, grad_y.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_w = (g_NO.T @ x.reshape(-1, x.shape[-1]).to(dtype)).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g_NO.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def expert_linear(x: torch.Tensor, linear: nn.Module, owner: nn.Module) -> torch.Tensor:
    """``linear(x)``, skipping the weight gradient at backward time if ``owner`` is frozen.

    A linear that PEFT has wrapped (LoRA) runs as PEFT defines it: its frozen base has no weight
    gradient anyway, and its LoRA gradients are dropped after the backward pass instead.
    """
    if type(linear) is not nn.Linear:
        return linear(x)
    return _ExpertLinear.apply(x, linear.weight, linear.bias, owner)


class ExpertFFN(nn.Module):
    """A BERT-style expert: ``fc_out(act(fc_in(x)))``, a copy of the dense FFN.

    ``trainable`` (default True) is read during the backward pass; see :class:`_ExpertLinear`.
    """

    def __init__(self, hidden: int, intermediate: int, act: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fc_in = nn.Linear(hidden, intermediate)
        self.act = act
        self.fc_out = nn.Linear(intermediate, hidden)
        self.trainable = True

    def forward(self, x_NH: torch.Tensor) -> torch.Tensor:
        return expert_linear(self.act(expert_linear(x_NH, self.fc_in, self)), self.fc_out, self)


class GatedExpertFFN(nn.Module):
    """A Llama-style (SwiGLU) expert: ``down(act(gate(x)) * up(x))``, a copy of the dense MLP."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        act: Callable[[torch.Tensor], torch.Tensor],
        bias: bool = False,
    ):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = act
        self.trainable = True

    def forward(self, x_NH: torch.Tensor) -> torch.Tensor:
        gate = self.act_fn(expert_linear(x_NH, self.gate_proj, self))
        return expert_linear(gate * expert_linear(x_NH, self.up_proj, self), self.down_proj, self)


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
        shared = _shared_modules(self.experts)
        if shared:  # some indices share one module (FLUX's merged experts): run it once
            return self._forward_shared(x_NH, weights_NK, idx_NK, shared).reshape(shape)
        for e, token, slot in _dispatch(idx_NK, self.num_experts):
            y_MH = self.experts[e](x_NH[token]) * weights_NK[token, slot, None]
            out_NH.index_add_(0, token, y_MH)
        return out_NH.reshape(shape)

    def _forward_shared(self, x_NH, weights_NK, idx_NK, groups: list[list[int]]) -> torch.Tensor:
        """eq. (2) when several expert indices are one module: a token routed to two of them
        is computed once, with their gate weights summed."""
        out_NH = torch.zeros_like(x_NH)
        for indices in groups:
            hit_NK = torch.isin(idx_NK, torch.tensor(indices, device=idx_NK.device))
            token = hit_NK.any(-1).nonzero().flatten()
            if token.numel() == 0:
                continue
            w_N = (weights_NK * hit_NK).sum(-1)[token]
            out_NH.index_add_(0, token, self.experts[indices[0]](x_NH[token]) * w_N[:, None])
        return out_NH


def _dispatch(idx_NK: torch.Tensor, num_experts: int):
    """(e, tokens, slots) for each expert that receives tokens, in expert order, each expert's
    tokens ascending: what ``torch.where(idx_NK == e)`` gives per expert, from one stable sort
    and one host synchronisation (the counts) per layer instead of two per expert (the dynamic
    shape of ``torch.where`` and the empty check), which on a GPU stall the stream E times a
    layer. The same tokens in the same order, so the block's output is the same bit for bit
    (``tests/test_model.py`` compares it with the per-expert loop)."""
    flat = idx_NK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one synchronisation
    top_k = idx_NK.shape[-1]
    token_all, slot_all = order // top_k, order % top_k
    start = 0
    for e, count in enumerate(counts):
        if count:
            yield e, token_all[start : start + count], slot_all[start : start + count]
        start += count


def _shared_modules(experts: nn.ModuleList) -> list[list[int]] | None:
    """The expert indices of each distinct module, if some module serves several; else None."""
    groups: dict[int, list[int]] = {}
    for e, expert in enumerate(experts):
        groups.setdefault(id(expert), []).append(e)
    return list(groups.values()) if len(groups) < len(experts) else None
