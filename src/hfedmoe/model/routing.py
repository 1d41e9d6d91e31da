"""What a forward pass through the MoE blocks computes and records: the routers' logits and
choices (:class:`RoutingCapture`), routing restricted to allowed experts (:func:`strict_hook`),
and what spares a pass what its caller never reads (:func:`lean_forward`,
:func:`logits_at`).

Shape legend: B samples, T tokens per sample, N tokens in a layer's stream (B*T), E experts per
layer, K experts per token.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hfedmoe.model.moe_layers import MoELayer


def lean_forward(model: nn.Module, logits_to_keep: int = 1) -> dict[str, object]:
    """Keyword arguments that spare a forward pass the work its caller never reads: logits at
    the last ``logits_to_keep`` positions only, and no key/value cache. A causal LM's logits are
    the largest tensor of an inference pass (SmolLM2: 32 x 96 positions x 49,152 words = 604 MB
    a batch, and a fifth of its compute), so a pass that reads only the routers keeps one.

    Empty for a model whose forward takes neither (encoders, Switch): it computes as before.
    A PEFT model passes them on to the model it wraps.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(base.forward).parameters
    options: dict[str, object] = {}
    if "logits_to_keep" in accepted:
        options["logits_to_keep"] = logits_to_keep
    if "use_cache" in accepted:
        options["use_cache"] = False
    return options


@contextmanager
def logits_at(model: nn.Module, keep_BT: torch.Tensor) -> Iterator[bool]:
    """While active, a causal LM's output layer computes logits only at the positions
    ``keep_BT`` marks (bool, one per input position), in row-major order: ``model(...).logits``
    is then (N, V) for N marked positions instead of (B, T, V).

    Language-model evaluation scores only the positions with a label (a chat's answer: a few of
    each row's 128), and every position's logits are the pass's largest tensor (SmolLM2, 64 x
    128 positions x 49,152 words: 1.6 GB in fp32, and more than twice that once the loss is
    computed). transformers' ``logits_to_keep`` keeps the same positions in every row, which
    does not fit rows whose answers start at different places, so the output layer's input is
    selected here, by a forward pre-hook on it. Do not pass ``labels`` to the model meanwhile:
    its own loss expects every position's logits.

    Yields whether it selects: a model that names no output layer
    (``get_output_embeddings()`` is None) computes every position's logits as before.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None:
        yield False
        return

    def select(module: nn.Module, args: tuple) -> tuple:
        hidden_BTH, *rest = args
        if hidden_BTH.shape[:2] != keep_BT.shape:
            raise ValueError(
                f"the output layer received {tuple(hidden_BTH.shape[:2])} positions, "
                f"expected {tuple(keep_BT.shape)}"
            )
        return (hidden_BTH[keep_BT], *rest)

    handle = head.register_forward_pre_hook(select)
    try:
        yield True
    finally:
        handle.remove()


@dataclass
class _Record:
    logits_NE: torch.Tensor
    chosen_NE: torch.Tensor  # bool: token n was sent to expert e


class RoutingCapture:
    """Records, for every MoE layer, the router logits and routing decisions of a forward pass.

    Use as ``with em.capture() as cap: model(**batch)``, then :meth:`sample_probs` and
    :meth:`routed`. Hooks are removed on exit.
    """

    def __init__(self, layers: list[MoELayer]):
        self.layers = layers
        self.records: dict[int, _Record] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> RoutingCapture:
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: MoELayer):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            if layer.kind == "switch":
                dispatch, _, logits = output
                chosen = dispatch.reshape(-1, layer.num_experts).bool()
            else:
                logits, _, indices = output
                chosen = torch.zeros(
                    logits.shape[0], layer.num_experts, dtype=torch.bool, device=logits.device
                )
                chosen.scatter_(1, indices.reshape(logits.shape[0], -1), True)
            # on the CPU: (tokens, E) is small, and selection code then never meets a device
            self.records[layer.position] = _Record(
                logits.detach().reshape(-1, layer.num_experts).cpu(), chosen.detach().cpu()
            )

        return hook

    def _per_sample(self, x_NE: torch.Tensor, mask_BT: torch.Tensor | None) -> tuple:
        """View (N, E) as (B, T, E) with a (B, T) real-token mask (on the CPU, as the records)."""
        mask_BT = None if mask_BT is None else mask_BT.cpu()
        if mask_BT is not None and x_NE.shape[0] == mask_BT.numel():
            B, T = mask_BT.shape
            return x_NE.reshape(B, T, -1), mask_BT.bool()
        if mask_BT is not None and x_NE.shape[0] % mask_BT.shape[0] == 0:
            # another token stream (e.g. a seq2seq decoder): every token counts
            B = mask_BT.shape[0]
            x = x_NE.reshape(B, x_NE.shape[0] // B, -1)
            return x, torch.ones(x.shape[:2], dtype=torch.bool)
        return x_NE.unsqueeze(0), torch.ones(1, x_NE.shape[0], dtype=torch.bool)

    def sample_probs(
        self, attention_mask: torch.Tensor | None, reduce: Literal["mean", "max"] = "mean"
    ) -> torch.Tensor:
        """G_e(x_i): per-sample router probabilities, (L, B, E).

        The full softmax over all E experts of each token, reduced over the sample's real
        (non-padding) tokens by mean (METHOD.md §7 default) or max.
        """
        out = []
        for layer in self.layers:
            probs_NE = torch.softmax(self.records[layer.position].logits_NE.float(), dim=-1)
            probs_BTE, real_BT = self._per_sample(probs_NE, attention_mask)
            if reduce == "mean":
                weights = real_BT.unsqueeze(-1).to(probs_BTE.dtype)
                out.append((probs_BTE * weights).sum(1) / weights.sum(1).clamp_min(1))
            else:
                out.append(probs_BTE.masked_fill(~real_BT.unsqueeze(-1), 0).amax(1))
        return torch.stack(out)

    def tokens(
        self, attention_mask: torch.Tensor | None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per MoE layer, the real (non-padding) tokens' router probabilities (N, E) (softmax
        over all experts), top-k choices (N, E) bool, and the sample each token is of (N,)."""
        out = []
        for layer in self.layers:
            record = self.records[layer.position]
            probs_BTE, real_BT = self._per_sample(
                torch.softmax(record.logits_NE.float(), dim=-1), attention_mask
            )
            chosen_BTE, _ = self._per_sample(record.chosen_NE, attention_mask)
            B, T = real_BT.shape
            sample_BT = torch.arange(B)[:, None].expand(B, T)
            out.append((probs_BTE[real_BT], chosen_BTE[real_BT], sample_BT[real_BT]))
        return out

    def routed(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """E_union: (L, E) bool, experts that top-k routing sent at least one real token to."""
        out = []
        for layer in self.layers:
            chosen_BTE, real_BT = self._per_sample(
                self.records[layer.position].chosen_NE, attention_mask
            )
            out.append((chosen_BTE & real_BT.unsqueeze(-1)).flatten(0, 1).any(0))
        return torch.stack(out)


# ---- the interface --------------------------------------------------------------------


def strict_hook(layer: MoELayer, allowed_E: torch.Tensor):
    k = layer.top_k

    def hook(module: nn.Module, args: tuple, output: tuple):
        if layer.kind == "switch":
            dispatch, own_probs, logits = output
            allowed = allowed_E.to(logits.device)
            probs = torch.softmax(logits.float(), dim=-1)
            masked = probs.masked_fill(~allowed, -1.0)
            choice = masked.argmax(-1)
            one_hot = nn.functional.one_hot(choice, layer.num_experts)
            capacity_ok = torch.cumsum(one_hot, dim=-2) <= module.expert_capacity
            chosen_probs = probs.gather(-1, choice.unsqueeze(-1)).to(own_probs.dtype)
            return (one_hot * capacity_ok).to(dispatch.dtype), chosen_probs, logits
        logits, weights, _ = output
        allowed = allowed_E.to(logits.device)
        scores = (
            torch.softmax(logits.float(), -1)
            if layer.rule.score == "softmax"
            else logits.float().sigmoid()
        )
        bias = getattr(module, "e_score_correction_bias", None)  # DeepSeek-V3 chooses with it
        choice = (scores if bias is None else scores + bias).masked_fill(~allowed, float("-inf"))
        n_allowed = int(allowed.sum())
        top_w, top_i = torch.topk(choice, min(k, n_allowed), dim=-1)
        top_w = scores.gather(-1, top_i)
        if n_allowed < k:  # keep K columns: repeat the best allowed expert with weight 0
            pad = k - n_allowed
            top_i = torch.cat([top_i, top_i[:, :1].expand(-1, pad)], dim=-1)
            top_w = torch.cat([top_w, torch.zeros_like(top_w[:, :1]).expand(-1, pad)], dim=-1)
        if layer.rule.norm_topk:
            top_w = top_w / (top_w.sum(-1, keepdim=True) + 1e-20)
        return logits, (top_w * layer.rule.scaling).to(weights.dtype), top_i

    return hook
