"""LoRA adapters through PEFT, placed by the expert interface.

- fused experts (transformers 5.x): PEFT's ``target_parameters`` on the 3-D expert tensors;
  its stacked LoRA keeps one rank-r slice per expert, which the expert interface addresses like
  an expert (``ExpertModel.read_expert`` returns the slices);
- per-module experts (upcycled, Switch): ``target_modules`` on each expert's linears;
- attention: ``target_modules`` on the linears inside attention blocks;
- routers: the router weights (``target_parameters`` for a bare weight, a module otherwise).

A classifier's new head is trained in full (``modules_to_save``). Base weights are frozen,
optionally quantised to 4 or 8 bits (QLoRA-style, ``quantize``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn
from transformers import PreTrainedModel

from hfedmoe.foundation.config import LoraConfig
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.moe_layers import expert_modules
from hfedmoe.model.quantize import quantize_base

if TYPE_CHECKING:
    from peft import PeftModel


def add_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """Wrap ``model`` with LoRA adapters where ``cfg.targets`` says, on a base quantised first
    if ``cfg.quantize`` says so (``hfedmoe.model.quantize``)."""
    if cfg.quantize:
        quantize_base(model, cfg.quantize)
    em = ExpertModel(model)
    modules: list[str] = []
    parameters: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}
    if "experts" in cfg.targets:
        for layer in em.layers:
            if layer.fused:
                parameters += [n for n in layer.expert_param_names]
            else:
                modules += [
                    names[id(m)]
                    for expert in expert_modules(layer.block)
                    for m in expert.modules()
                    if isinstance(m, nn.Linear)
                ]
    if "routers" in cfg.targets:
        for layer in em.layers:
            if isinstance(layer.router, nn.Linear):
                modules.append(names[id(layer.router)])
            else:
                parameters += list(layer.router_params)
    if "attention" in cfg.targets:
        modules += [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(k in n.lower() for k in ("attention", "attn"))
        ]
    if parameters and cfg.dropout > 0:
        raise ConfigError(
            "model.lora.dropout: must be 0 when adapters sit on fused expert or router weights "
            "(PEFT's target_parameters does not support dropout)"
        )
    head = [n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)]
    # imported here: peft (and the bitsandbytes it loads) costs ~190 MB of RSS per process
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=modules or None,
        target_parameters=parameters or None,
        modules_to_save=head or None,
    )
    return get_peft_model(model, peft_cfg)
