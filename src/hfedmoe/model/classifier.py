"""Upcycled MoE models from dense checkpoints: a sequence classifier (BERT-family encoders) and a
causal language model (Llama-style decoders such as SmolLM2).

Also the checkpoint format: a directory holding ``model.safetensors`` (the state dict),
``config.json`` (the dense base's Hugging Face config with the label names), the tokenizer
files, and ``hfedmoe.json`` (the upcycling options), which together rebuild the model without
the original base model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from hfedmoe.config import ModelConfig
from hfedmoe.errors import HFedMoEError
from hfedmoe.model.lora import add_lora
from hfedmoe.model.sources import model_dir as resolve_model_dir
from hfedmoe.model.upcycle import LLAMA_LIKE, upcycle

WEIGHTS_FILE = "model.safetensors"
META_FILE = "hfedmoe.json"
FORMAT_VERSION = 1

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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if pretrained:
            model = auto.from_pretrained(directory, config=config, dtype="float32")
        else:
            model = auto.from_config(config, dtype="float32")
        upcycle(
            model,
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            layers=cfg.moe_layers,
            router_init_std=cfg.router_init_std,
            expert_noise_std=cfg.expert_noise_std,
            generator=torch.Generator().manual_seed(seed),
        )
        if cfg.lora is not None:
            model = add_lora(model, cfg.lora)
    return model


def load_tokenizer(
    cfg: ModelConfig, model_dir: str | Path | None = None
) -> PreTrainedTokenizerBase:
    directory = Path(model_dir) if model_dir else resolve_model_dir(cfg.name_or_path)
    return AutoTokenizer.from_pretrained(directory)


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


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: ModelConfig,
    directory: str | Path,
) -> Path:
    """Write a self-contained checkpoint; atomic: a temporary folder renamed into place."""
    directory = Path(directory)
    if directory.exists():
        raise HFedMoEError(f"checkpoint directory '{directory}' already exists; not overwriting")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        # save_model stores a tied tensor (an LM head sharing the embedding) once
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        task = "causal-lm" if type(base).__name__.endswith("ForCausalLM") else "classification"
        meta = {"format_version": FORMAT_VERSION, "task": task, "model": cfg.model_dump()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(
    directory: str | Path,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Rebuild a model saved by :func:`save_checkpoint` (in eval mode) and its tokenizer."""
    directory = Path(directory)
    for name in (WEIGHTS_FILE, META_FILE, "config.json"):
        if not (directory / name).is_file():
            raise HFedMoEError(f"checkpoint '{directory}' is missing {name}")
    meta = json.loads((directory / META_FILE).read_text())
    cfg = ModelConfig.model_validate(meta["model"])
    if meta.get("task") == "causal-lm":
        model = build_causal_lm(cfg, seed=0, pretrained=False, model_dir=directory)
    else:
        config = AutoConfig.from_pretrained(directory)
        labels = [config.id2label[i] for i in range(config.num_labels)]
        model = build_classifier(cfg, labels, seed=0, pretrained=False, model_dir=directory)
    missing, unexpected = load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    assert not missing and not unexpected
    return model.eval(), AutoTokenizer.from_pretrained(directory)
