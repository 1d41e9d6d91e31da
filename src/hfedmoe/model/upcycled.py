"""Upcycled MoE models from dense checkpoints: a sequence classifier (BERT-family encoders) and a
causal language model (Llama-style decoders such as SmolLM2)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from hfedmoe.foundation.config import ModelConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.model.adapters import add_moe_adapters
from hfedmoe.model.lora import add_lora
from hfedmoe.model.moe import MoEFeedForward
from hfedmoe.model.sources import model_dir as resolve_model_dir
from hfedmoe.model.upcycle import LLAMA_LIKE, upcycle

# The new classification head is "missing" from every dense checkpoint: expected, not news.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


def build_classifier(
    cfg: ModelConfig,
    label_names: tuple[str, ...] | list[str],
    *,
    seed: int,
    pretrained: bool = True,
    model_dir: str | Path | None = None,
) -> PreTrainedModel:
    """The upcycled sequence classifier (a BERT-family encoder + a new head).

    ``pretrained=True`` loads the dense weights from the model directory; ``False`` builds the
    same architecture with random weights (for a client that will receive the global weights).
    The new head and the routers are initialised from ``seed``.
    """
    directory = Path(model_dir) if model_dir else resolve_model_dir(cfg.name_or_path)
    config = _load_config(directory, label_names)
    return _upcycled(AutoModelForSequenceClassification, directory, config, cfg, seed, pretrained)


def build_causal_lm(
    cfg: ModelConfig, *, seed: int, pretrained: bool = True, model_dir: str | Path | None = None
) -> PreTrainedModel:
    """The upcycled causal language model (a Llama-style decoder, e.g. SmolLM2-135M)."""
    directory = Path(model_dir) if model_dir else resolve_model_dir(cfg.name_or_path)
    config = AutoConfig.from_pretrained(directory)
    if config.model_type not in LLAMA_LIKE:
        raise HFedMoEError(
            f"model.name_or_path: model type '{config.model_type}' is not a supported decoder "
            f"(expected one of: {', '.join(LLAMA_LIKE)})"
        )
    return _upcycled(AutoModelForCausalLM, directory, config, cfg, seed, pretrained)


def _upcycled(auto, directory, config, cfg: ModelConfig, seed: int, pretrained: bool):
    """The dense model of ``directory`` made an MoE (or given MoE adapters), LoRA if asked."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if pretrained:
            model = auto.from_pretrained(directory, config=config, dtype="float32")
        else:
            model = auto.from_config(config, dtype="float32")
        generator = torch.Generator().manual_seed(seed)
        if cfg.moe_adapters is not None:  # FFT-MoE: the dense parent, frozen, with adapters
            add_moe_adapters(model, cfg.moe_adapters, cfg.moe_adapters.layers, generator)
        else:
            upcycle(
                model,
                num_experts=cfg.num_experts,
                top_k=cfg.top_k,
                layers=cfg.moe_layers,
                router_init_std=cfg.router_init_std,
                expert_noise_std=cfg.expert_noise_std,
                generator=generator,
            )
        for block in model.modules():
            if isinstance(block, MoEFeedForward):
                block.expert_compute = cfg.expert_compute
        if cfg.lora is not None:
            model = add_lora(model, cfg.lora)
    return model


def load_tokenizer(
    cfg: ModelConfig, model_dir: str | Path | None = None
) -> PreTrainedTokenizerBase:
    """The model directory's tokenizer; one without a padding token pads with end-of-sequence."""
    directory = Path(model_dir) if model_dir else resolve_model_dir(cfg.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_config(directory: Path, label_names: tuple[str, ...] | list[str]):
    if not (directory / "config.json").is_file():
        raise HFedMoEError(f"model.name_or_path: '{directory}' has no config.json")
    config = AutoConfig.from_pretrained(
        directory,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    if config.model_type != "bert":
        raise HFedMoEError(
            f"model.name_or_path: model type '{config.model_type}' is not supported yet "
            "(expected a BERT-family encoder)"
        )
    return config
