"""Sparse upcycling: turn a dense transformer's FFNs into Mixture-of-Experts blocks.

Each upcycled layer's FFN is copied into E experts and a router is added (Komatsuzaki et al.,
2023). With identical experts and renormalised top-k weights the upcycled model computes exactly
what the dense model did, for any top-k and any subset of experts; optional noise on the expert
copies breaks that symmetry from the start.

We do not fork model code from transformers; per architecture we only say where a layer's dense
FFN is and where the MoE block goes:

- BERT encoders: the FFN is split over ``intermediate`` (up-projection + activation) and
  ``output.dense`` (down-projection). The MoE block replaces ``intermediate`` and
  ``output.dense`` becomes an identity, so the layer's own dropout, residual and LayerNorm still
  run after the experts.
- Llama-style decoders (Llama, Mistral, Qwen2/3; SmolLM2 is a Llama): ``mlp`` is the FFN; the
  MoE block, whose experts are SwiGLU copies of that ``mlp``, replaces it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.model.moe import ExpertFFN, GatedExpertFFN, MoEFeedForward

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
UPCYCLABLE = ("bert", *LLAMA_LIKE)


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


def _take_dense_ffn(model: PreTrainedModel, layer: nn.Module) -> nn.Module:
    if model.config.model_type == "bert":
        dense = ExpertFFN(
            model.config.hidden_size,
            model.config.intermediate_size,
            layer.intermediate.intermediate_act_fn,
        )
        with torch.no_grad():
            dense.fc_in.load_state_dict(layer.intermediate.dense.state_dict())
            dense.fc_out.load_state_dict(layer.output.dense.state_dict())
        return dense
    mlp = layer.mlp  # Llama-style: gate_proj, up_proj, down_proj
    dense = GatedExpertFFN(
        model.config.hidden_size,
        model.config.intermediate_size,
        mlp.act_fn,
        bias=bool(getattr(model.config, "mlp_bias", False)),
    )
    dense.load_state_dict(mlp.state_dict())
    return dense


def _install(model: PreTrainedModel, layer: nn.Module, block: MoEFeedForward) -> None:
    if model.config.model_type == "bert":
        layer.intermediate = block
        layer.output.dense = nn.Identity()
    else:
        layer.mlp = block


def transformer_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer blocks of a BERT or Llama-style model, in order."""
    if model.config.model_type == "bert":
        return model.base_model.encoder.layer
    return model.base_model.layers


def upcycle(
    model: PreTrainedModel,
    *,
    num_experts: int,
    top_k: int,
    layers: list[int] | str,
    router_init_std: float,
    expert_noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> PreTrainedModel:
    """Upcycle the FFNs of ``layers`` of a BERT or Llama-style model in place; return it.

    ``expert_noise_std`` > 0 adds Gaussian noise to every expert copy's weights, with a standard
    deviation of that fraction of each weight matrix's own standard deviation.
    """
    model_type = model.config.model_type
    if model_type not in UPCYCLABLE:
        raise HFedMoEError(
            f"model.name_or_path: cannot upcycle model type '{model_type}' "
            f"(expected one of: {', '.join(UPCYCLABLE)})"
        )
    all_layers = transformer_blocks(model)
    for i in resolve_layers(layers, len(all_layers)):
        layer = all_layers[i]
        dense = _take_dense_ffn(model, layer)
        experts = [copy.deepcopy(dense) for _ in range(num_experts)]
        if expert_noise_std > 0:
            with torch.no_grad():
                for expert in experts:
                    for w in expert.parameters():
                        if w.dim() >= 2:
                            noise = torch.randn(w.shape, generator=generator)
                            w.add_(noise * (expert_noise_std * w.std()))
        block = MoEFeedForward(experts, model.config.hidden_size, top_k)
        with torch.no_grad():
            block.gate.weight.normal_(0.0, router_init_std, generator=generator)
        _install(model, layer, block)
    return model


def moe_blocks(model: nn.Module) -> list[MoEFeedForward]:
    """The model's upcycled MoE blocks in layer order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]
