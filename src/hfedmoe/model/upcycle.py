"""Sparse upcycling: turn a dense transformer's FFNs into Mixture-of-Experts blocks.

Each upcycled layer's FFN is copied into E identical experts and a router is added
(Komatsuzaki et al., 2023). With renormalised top-k weights the upcycled model computes
exactly what the dense model did, for any top-k and any subset of experts, until training
makes the experts differ.

We do not fork model code from transformers: in a BERT layer we replace ``intermediate`` (the
up-projection + activation) by the MoE block and ``output.dense`` (the down-projection) by an
identity, so the layer's own dropout, residual and LayerNorm still run after the experts.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from hfedmoe.errors import HFedMoEError
from hfedmoe.model.moe import ExpertFFN, MoEFeedForward


def resolve_layers(moe_layers: list[int] | str, num_layers: int) -> list[int]:
    """``"all"`` or explicit indices -> a sorted list of valid layer indices."""
    if moe_layers == "all":
        return list(range(num_layers))
    assert isinstance(moe_layers, list)
    bad = [i for i in moe_layers if not 0 <= i < num_layers]
    if bad:
        raise HFedMoEError(
            f"model.moe_layers: {bad} out of range for a {num_layers}-layer model "
            f"(expected indices 0..{num_layers - 1})"
        )
    return sorted(moe_layers)


def upcycle_bert(
    model: PreTrainedModel,
    *,
    num_experts: int,
    top_k: int,
    layers: list[int],
    router_init_std: float,
    generator: torch.Generator | None = None,
) -> PreTrainedModel:
    """Upcycle the FFNs of ``layers`` of a BERT-family model in place and return it."""
    encoder_layers = model.base_model.encoder.layer
    hidden = model.config.hidden_size
    for i in layers:
        layer = encoder_layers[i]
        dense = ExpertFFN(
            hidden, model.config.intermediate_size, layer.intermediate.intermediate_act_fn
        )
        with torch.no_grad():
            dense.fc_in.load_state_dict(layer.intermediate.dense.state_dict())
            dense.fc_out.load_state_dict(layer.output.dense.state_dict())
        moe = MoEFeedForward([copy.deepcopy(dense) for _ in range(num_experts)], hidden, top_k)
        with torch.no_grad():
            moe.gate.weight.normal_(0.0, router_init_std, generator=generator)
        layer.intermediate = moe
        layer.output.dense = nn.Identity()
    return model


def moe_blocks(model: nn.Module) -> list[MoEFeedForward]:
    """The model's MoE blocks in layer order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]
