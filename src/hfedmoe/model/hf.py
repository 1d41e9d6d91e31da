"""Hugging Face MoE families, loaded from a local directory with ``from_pretrained``.

Nothing is downloaded: ``path`` must hold ``config.json``, the weights and (for training) a
tokenizer, as written by ``save_pretrained``. The expert view of every family comes from
:mod:`hfedmoe.model.experts`; no model code is forked here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PreTrainedModel,
)

from hfedmoe.foundation.config import LoraConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.model.lora import add_lora

#: model_type -> the Auto class that loads it (the architecture the paper used is Switch).
SUPPORTED_MOE_FAMILIES = {
    "switch_transformers": AutoModelForSeq2SeqLM,
    "mixtral": AutoModelForCausalLM,
    "qwen2_moe": AutoModelForCausalLM,
    "qwen3_moe": AutoModelForCausalLM,
    "olmoe": AutoModelForCausalLM,
    "deepseek_v2": AutoModelForCausalLM,
    "deepseek_v3": AutoModelForCausalLM,
}


def register_moe_family(model_type: str, auto_class: type) -> None:
    """Make the transformers MoE architecture ``model_type`` loadable by ``model.name_or_path``,
    through ``auto_class`` (e.g. ``AutoModelForCausalLM``). Its MoE blocks must have the layout
    :mod:`hfedmoe.model.experts` reads (an ``experts`` child and a ``gate`` router); a plugin
    (``plugins`` in the config) calls this (docs/EXTENDING.md)."""
    SUPPORTED_MOE_FAMILIES[model_type] = auto_class


def load_moe_model(
    path: str | Path, lora: LoraConfig | None = None, *, pretrained: bool = True, seed: int = 0
) -> PreTrainedModel:
    """Load a supported MoE checkpoint from a local directory (float32, eval mode), with LoRA
    adapters on a frozen base if ``lora`` is given. ``pretrained=False``: the architecture only,
    with random weights from ``seed``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise HFedMoEError(f"model.name_or_path: '{path}' has no config.json")
    model_type = AutoConfig.from_pretrained(path).model_type
    auto = SUPPORTED_MOE_FAMILIES.get(model_type)
    if auto is None:
        known = ", ".join(sorted(SUPPORTED_MOE_FAMILIES))
        raise HFedMoEError(
            f"model.name_or_path: architecture '{model_type}' is not a supported MoE family "
            f"(expected one of: {known})"
        )
    if pretrained:
        model = auto.from_pretrained(path, dtype="float32")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto.from_config(AutoConfig.from_pretrained(path), dtype="float32")
    if lora is not None:
        model = add_lora(model, lora)
    return model.eval()
