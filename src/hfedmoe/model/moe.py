"""A top-k routed Mixture-of-Experts feed-forward block, laid out like transformers 5.x MoEs.

Shape legend: B batch, T tokens per sample, N = B*T tokens, H hidden size, I expert FFN size,
E experts, K experts per token (top-k).

As in Mixtral/Qwen-MoE, the block is a ``gate`` (a router module returning logits, top-k weights
and top-k indices) and ``experts``. Unlike them, each expert is a module of its own (a copy of
the dense FFN it was upcycled from, biases included), so an expert that receives no tokens gets
no gradient at all (``grad is None``) and a standard optimizer leaves it untouched.

Two ways to compute the experts (``model.expert_compute``), equal in meaning:

* ``loop``, the reference: one call per expert that receives tokens, after one sort and one host
  synchronisation per layer (:func:`_dispatch`);
* ``grouped``: the tokens sorted by expert and each projection of every expert computed in one
  ``torch._grouped_mm`` (:class:`_GroupedLinear`), with no host synchronisation in the forward
  pass and one per layer in the backward pass (which experts received rows, so that the others'
  ``grad`` stays None). It stacks one projection's expert weights for the call (a transient copy
  of that projection's experts in the compute dtype), and falls back to the loop where the
  kernel, the dtype or the shapes do not allow it (PEFT-wrapped experts, FLUX's merged experts,
  rows not 16-byte aligned).

``auto`` (the default) is grouped on CUDA and the loop on the CPU, where the loop is faster
(docs/BENCHMARKS.md) and keeps every fp32 value bit for bit. Grouped values equal the loop's up
to rounding, not bit for bit: a grouped biased expert adds its bias after the product, where
``nn.Linear`` fuses it, and the grouped product is another GEMM shape than the loop's, which
some CPUs (AVX-512) block and so sum differently in the last bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

#: how a block computes its experts (``model.expert_compute``; see the module docstring)
EXPERT_COMPUTE = ("auto", "loop", "grouped")


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
        # under autocast (train.precision = "bf16" or "fp16") the forward ran in 16 bits while
        # x or the weight were saved as they came: compute in the gradient's dtype, and give
        # each gradient its tensor's dtype (in fp32 every cast is a no-op)
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


class _GroupedLinear(torch.autograd.Function):
    """Every expert's ``x W_e^T + b_e`` in one grouped product, rows sorted by expert.

    ``x_MI`` holds the rows of all experts, expert 0's first; ``expert_M`` names each row's
    expert and ``offs_E`` the cumulative row counts (``torch._grouped_mm``'s offsets). The
    backward pass keeps :class:`_ExpertLinear`'s contract per expert: a frozen expert
    (``owner.trainable`` False when the backward pass reaches it) and an expert with no rows get
    no weight gradient (None, not zeros), while the input gradient flows for all.
    """

    @staticmethod
    def forward(ctx, x_MI, expert_M, offs_E, owners, *params):
        num = len(owners)
        weight_list, biases = params[:num], params[num:]
        dtype = _compute_dtype(x_MI)
        W_EIO = torch.stack([w.to(dtype) for w in weight_list]).transpose(1, 2)
        y_MO = torch._grouped_mm(x_MI.to(dtype), W_EIO, offs=offs_E)
        if biases:
            y_MO = y_MO + torch.stack(biases).to(dtype)[expert_M]
        ctx.save_for_backward(x_MI, expert_M, offs_E, *weight_list)
        ctx.owners, ctx.has_bias = owners, bool(biases)
        return y_MO

    @staticmethod
    def backward(ctx, grad_MO):
        x_MI, expert_M, offs_E, *weight_list = ctx.saved_tensors
        grad_MO = grad_MO.contiguous()  # the kernel needs real strides (not an expanded view)
        num, dtype = len(weight_list), grad_MO.dtype
        need_w = ctx.needs_input_grad[4 : 4 + num]
        need_b = ctx.needs_input_grad[4 + num :] if ctx.has_bias else (False,) * num
        grad_x = None
        if ctx.needs_input_grad[0]:
            W_EOI = torch.stack([w.to(dtype) for w in weight_list])
            grad_x = torch._grouped_mm(grad_MO, W_EOI, offs=offs_E).to(x_MI.dtype)
        trained = [ctx.owners[e].trainable and (need_w[e] or need_b[e]) for e in range(num)]
        if any(trained):
            # the backward pass's one host synchronisation: which experts received rows
            rows = torch.bincount(expert_M, minlength=num).tolist()
            trained = [t and count > 0 for t, count in zip(trained, rows, strict=True)]
        want_w = [t and w for t, w in zip(trained, need_w, strict=True)]
        want_b = [t and b for t, b in zip(trained, need_b, strict=True)]
        grad_w: list[torch.Tensor | None] = [None] * num
        grad_b: list[torch.Tensor | None] = [None] * num
        if any(want_w):
            # one (O, I) product per expert over its own rows: grad_y_e^T x_e
            G_EOI = torch._grouped_mm(grad_MO.T, x_MI.to(dtype), offs=offs_E)
            grad_w = [
                G_EOI[e].to(w.dtype) if want_w[e] else None for e, w in enumerate(weight_list)
            ]
        if any(want_b):
            sums_EO = grad_MO.new_zeros(num, grad_MO.shape[-1]).index_add_(0, expert_M, grad_MO)
            grad_b = [
                sums_EO[e].to(w.dtype) if want_b[e] else None for e, w in enumerate(weight_list)
            ]
        return grad_x, None, None, None, *grad_w, *(grad_b if ctx.has_bias else ())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in here: autocast's, where it is on, else the input's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def grouped_linear(
    x_MI: torch.Tensor,
    expert_M: torch.Tensor,
    offs_E: torch.Tensor,
    linears: Sequence[nn.Linear],
    owners: Sequence[nn.Module],
) -> torch.Tensor:
    """``linears[e](x)`` for each row of ``x_MI`` and its expert ``e``, in one grouped product."""
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears if linear.bias is not None]
    if biases and len(biases) != len(linears):
        raise ValueError("grouped experts must all have a bias or none")
    return _GroupedLinear.apply(x_MI, expert_M, offs_E, tuple(owners), *weights, *biases)


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

    @staticmethod
    def forward_grouped(
        experts: Sequence[ExpertFFN],
        x_MH: torch.Tensor,
        expert_M: torch.Tensor,
        offs_E: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`forward` of every expert at once, rows sorted by expert (see
        :func:`grouped_linear`)."""
        hidden = grouped_linear(x_MH, expert_M, offs_E, [e.fc_in for e in experts], experts)
        hidden = experts[0].act(hidden)
        return grouped_linear(hidden, expert_M, offs_E, [e.fc_out for e in experts], experts)

    def linears(self) -> tuple[nn.Module, ...]:
        return self.fc_in, self.fc_out


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

    @staticmethod
    def forward_grouped(
        experts: Sequence[GatedExpertFFN],
        x_MH: torch.Tensor,
        expert_M: torch.Tensor,
        offs_E: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`forward` of every expert at once, rows sorted by expert."""

        def project(name: str, x: torch.Tensor) -> torch.Tensor:
            linears = [getattr(e, name) for e in experts]
            return grouped_linear(x, expert_M, offs_E, linears, experts)

        gate = experts[0].act_fn(project("gate_proj", x_MH))
        return project("down_proj", gate * project("up_proj", x_MH))

    def linears(self) -> tuple[nn.Module, ...]:
        return self.gate_proj, self.up_proj, self.down_proj


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
        self.expert_compute = "auto"  # model.expert_compute; see the module docstring

    def forward(self, hidden_BTH: torch.Tensor) -> torch.Tensor:
        shape = hidden_BTH.shape
        x_NH = hidden_BTH.reshape(-1, shape[-1])
        _, weights_NK, idx_NK = self.gate(x_NH)
        weights_NK = weights_NK.to(x_NH.dtype)
        out_NH = torch.zeros_like(x_NH)
        shared = _shared_modules(self.experts)
        if shared:  # some indices share one module (FLUX's merged experts): run it once
            return self._forward_shared(x_NH, weights_NK, idx_NK, shared).reshape(shape)
        if self._grouped(x_NH):
            return self._forward_grouped(x_NH, weights_NK, idx_NK).reshape(shape)
        for e, token, slot in _dispatch(idx_NK, self.num_experts):
            y_MH = self.experts[e](x_NH[token]) * weights_NK[token, slot, None]
            out_NH.index_add_(0, token, y_MH)
        return out_NH.reshape(shape)

    def _grouped(self, x_NH: torch.Tensor) -> bool:
        """Whether this forward pass takes the grouped path (``expert_compute``, the experts'
        layout and what the kernel supports here)."""
        mode = self.expert_compute
        if mode == "loop" or (mode == "auto" and x_NH.device.type != "cuda"):
            return False
        kind = type(self.experts[0])
        if kind not in (ExpertFFN, GatedExpertFFN):
            return False
        if any(type(e) is not kind for e in self.experts):
            return False
        linears = [lin for e in self.experts for lin in e.linears()]
        if any(type(lin) is not nn.Linear for lin in linears):  # PEFT-wrapped: the loop
            return False
        dtype = _compute_dtype(x_NH)
        width = {lin.in_features for lin in linears} | {lin.out_features for lin in linears}
        if any(n * dtype.itemsize % 16 for n in width):  # the kernel's 16-byte row alignment
            return False
        return _grouped_mm_runs(x_NH.device.type, dtype)

    def _forward_grouped(self, x_NH, weights_NK, idx_NK) -> torch.Tensor:
        """eq. (2) with every expert's rows in one grouped product per projection: the same
        tokens, the same weights, the same order of the sum as the loop."""
        flat = idx_NK.reshape(-1)
        order = torch.argsort(flat, stable=True)
        expert_M = flat[order]
        # counts by index_add_, not bincount: CUDA's bincount reads its input's max on the host
        counts_E = flat.new_zeros(self.num_experts).index_add_(0, flat, torch.ones_like(flat))
        offs_E = counts_E.cumsum(0).to(torch.int32)
        token_M = torch.div(order, idx_NK.shape[-1], rounding_mode="floor")
        kind = type(self.experts[0])
        y_MH = kind.forward_grouped(list(self.experts), x_NH[token_M], expert_M, offs_E)
        y_MH = y_MH * weights_NK.reshape(-1)[order, None]
        return torch.zeros_like(x_NH).index_add_(0, token_M, y_MH)

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


@functools.cache
def _grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs on this device type in this dtype (its support varies
    with the torch build and the GPU): :class:`_GroupedLinear`'s three products tried once on a
    tiny case with an empty group, each checked against plain products."""
    if not hasattr(torch, "_grouped_mm"):
        return False

    def small(*shape: int) -> torch.Tensor:
        values = torch.arange(math.prod(shape), dtype=torch.float32) % 5 - 2
        return values.reshape(shape).to(device=device_type, dtype=dtype)

    x_MI, w_EOI, g_MO = small(3, 8), small(2, 16, 8), small(3, 16)
    offs = torch.tensor([0, 3], dtype=torch.int32, device=device_type)
    try:
        y = torch._grouped_mm(x_MI, w_EOI.transpose(1, 2), offs=offs)
        grad_x = torch._grouped_mm(g_MO, w_EOI, offs=offs)
        grad_w = torch._grouped_mm(g_MO.T, x_MI, offs=offs)
    except (RuntimeError, NotImplementedError):
        return False
    # an empty group's weight gradient is not read (no rows: no gradient), so not checked
    return (
        torch.equal(y, x_MI @ w_EOI[1].T)
        and torch.equal(grad_x, g_MO @ w_EOI[1])
        and torch.equal(grad_w[1], g_MO.T @ x_MI)
    )


def _shared_modules(experts: nn.ModuleList) -> list[list[int]] | None:
    """The expert indices of each distinct module, if some module serves several; else None."""
    groups: dict[int, list[int]] = {}
    for e, expert in enumerate(experts):
        groups.setdefault(id(expert), []).append(e)
    return list(groups.values()) if len(groups) < len(experts) else None
