"""Sparse MoE adapters beside the frozen FFNs of a dense model (FFT-MoE, METHOD.md §9b step 1).

In each adapted transformer block the FFN stays as it was, frozen, and an MoE adapter runs in
parallel with it on the same input:

    h = FFN(x) + s * sum_{m in TopK_k(x)} g_m(x) W2_m GELU(W1_m x)

M small experts (d -> hidden -> d) and a router W_R (M x d); g(x) is the softmax over the top-k
logits, which is what :class:`~hfedmoe.model.moe.MoEFeedForward` computes (softmax, top-k,
renormalised), so the adapter *is* an MoE block of this project: the expert interface
(``hfedmoe.model.experts``) sees its experts and its router like any other, and the
budget-aware machinery (routing capture, backward-only updates, expert uploads) works on it
unchanged. W2 starts at zero, so an adapted model computes exactly what its dense parent does
until it trains.

Everything of the parent is frozen except a classifier's new head; the adapters (routers
included) are what trains and what travels.

Where the adapter goes, per architecture (the FFN's input is the adapter's input):

- Llama-style decoders: ``mlp(x)`` becomes ``mlp(x) + s * adapter(x)``;
- BERT encoders: the FFN's output projection sits inside ``BertOutput`` before its dropout,
  residual and LayerNorm; the adapter's output is added to it there, on the attention output
  that ``intermediate`` received.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from hfedmoe.foundation.config import MoEAdapterConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.model.moe import ExpertFFN, MoEFeedForward
from hfedmoe.model.state import new_head
from hfedmoe.model.upcycle import UPCYCLABLE, resolve_layers, transformer_blocks


class ParallelAdapter(nn.Module):
    """A Llama-style block's ``mlp`` with an MoE adapter beside it: ``ffn(x) + s * adapter(x)``."""

    def __init__(self, ffn: nn.Module, adapter: MoEFeedForward, scale: float):
        super().__init__()
        self.ffn, self.adapter, self.scale = ffn, adapter, scale

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        return self.ffn(x_BTH) + self.scale * self.adapter(x_BTH)


class BertOutputWithAdapter(nn.Module):
    """``BertOutput`` with an MoE adapter added to the FFN's output projection:
    ``LayerNorm(dropout(dense(h) + s * adapter(x)) + x)``, x the attention output."""

    def __init__(self, output: nn.Module, adapter: MoEFeedForward, scale: float):
        super().__init__()
        self.output, self.adapter, self.scale = output, adapter, scale

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h = self.output.dense(hidden_states) + self.scale * self.adapter(input_tensor)
        return self.output.LayerNorm(self.output.dropout(h) + input_tensor)


def adapter_block(hidden: int, cfg: MoEAdapterConfig, generator: torch.Generator) -> MoEFeedForward:
    """An MoE adapter: ``cfg.experts`` GELU experts ``hidden -> cfg.hidden -> hidden`` with W2 = 0,
    a router drawn from N(0, router_init_std²), routing each token to ``cfg.top_k`` of them."""
    experts = [ExpertFFN(hidden, cfg.hidden, nn.functional.gelu) for _ in range(cfg.experts)]
    block = MoEFeedForward(experts, hidden, cfg.top_k)
    with torch.no_grad():
        for expert in experts:
            bound = 1.0 / hidden**0.5  # nn.Linear's own init, drawn from our generator
            expert.fc_in.weight.uniform_(-bound, bound, generator=generator)
            expert.fc_in.bias.uniform_(-bound, bound, generator=generator)
            expert.fc_out.weight.zero_()  # the adapter starts as a no-op
            expert.fc_out.bias.zero_()
        block.gate.weight.normal_(0.0, cfg.router_init_std, generator=generator)
    return block


def add_moe_adapters(
    model: PreTrainedModel,
    cfg: MoEAdapterConfig,
    layers: list[int] | str,
    generator: torch.Generator,
) -> PreTrainedModel:
    """Put an MoE adapter beside the FFN of each of ``layers`` (in place), freeze everything
    else but a classifier's head; return ``model``."""
    model_type = model.config.model_type
    if model_type not in UPCYCLABLE:
        raise HFedMoEError(
            f"model.name_or_path: cannot add MoE adapters to model type '{model_type}' "
            f"(expected one of: {', '.join(UPCYCLABLE)})"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = transformer_blocks(model)
    hidden = model.config.hidden_size
    for i in resolve_layers(layers, len(blocks)):
        block = blocks[i]
        adapter = adapter_block(hidden, cfg, generator)
        if model_type == "bert":
            block.output = BertOutputWithAdapter(block.output, adapter, cfg.scale)
        else:
            block.mlp = ParallelAdapter(block.mlp, adapter, cfg.scale)
    if (head := new_head(model)) is not None:
        head.requires_grad_(True)
    return model


def adapters(model: nn.Module) -> list[MoEFeedForward]:
    """The model's MoE adapters in layer order."""
    return [
        m.adapter for m in model.modules() if isinstance(m, ParallelAdapter | BertOutputWithAdapter)
    ]


@contextlib.contextmanager
def routing_top_k(model: nn.Module, k: int) -> Iterator[None]:
    """Route every token of every MoE adapter to its top ``k`` experts within the block
    (FFT-MoE's per-client k(c)); the configured k is restored on exit."""
    blocks = adapters(model)
    if any(not 1 <= k <= b.num_experts for b in blocks):
        raise ValueError(f"top-k must be in 1..{min(b.num_experts for b in blocks)}, got {k}")
    saved = [(b.top_k, b.gate.top_k) for b in blocks]
    try:
        for b in blocks:
            b.top_k = b.gate.top_k = k
        yield
    finally:
        for b, (block_k, gate_k) in zip(blocks, saved, strict=True):
            b.top_k, b.gate.top_k = block_k, gate_k
