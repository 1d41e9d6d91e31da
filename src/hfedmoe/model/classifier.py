"""The MoE sequence classifier: a shipped or local dense encoder, upcycled, plus a head.

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
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BertForSequenceClassification,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from hfedmoe.assets import resolve_model_dir
from hfedmoe.config import ModelConfig
from hfedmoe.errors import HFedMoEError
from hfedmoe.model.upcycle import resolve_layers, upcycle_bert

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
) -> BertForSequenceClassification:
    """Build the upcycled classifier.

    ``pretrained=True`` loads the dense weights from the model directory; ``False`` builds the
    same architecture with random weights (for a client that will receive the global weights).
    The new head and the routers are initialised from ``seed``.
    """
    directory = Path(model_dir) if model_dir else resolve_model_dir(cfg.name_or_path)
    config = _load_config(directory, label_names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if pretrained:
            model = BertForSequenceClassification.from_pretrained(directory, config=config)
        else:
            model = BertForSequenceClassification(config)
        generator = torch.Generator().manual_seed(seed)
        upcycle_bert(
            model,
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            layers=resolve_layers(cfg.moe_layers, config.num_hidden_layers),
            router_init_std=cfg.router_init_std,
            generator=generator,
        )
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
    model: BertForSequenceClassification,
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
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"format_version": FORMAT_VERSION, "model": cfg.model_dump()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(
    directory: str | Path,
) -> tuple[BertForSequenceClassification, PreTrainedTokenizerBase]:
    """Rebuild a model saved by :func:`save_checkpoint` (in eval mode) and its tokenizer."""
    directory = Path(directory)
    for name in (WEIGHTS_FILE, META_FILE, "config.json"):
        if not (directory / name).is_file():
            raise HFedMoEError(f"checkpoint '{directory}' is missing {name}")
    meta = json.loads((directory / META_FILE).read_text())
    cfg = ModelConfig.model_validate(meta["model"])
    config = AutoConfig.from_pretrained(directory)
    labels = [config.id2label[i] for i in range(config.num_labels)]
    model = build_classifier(cfg, labels, seed=0, pretrained=False, model_dir=directory)
    model.load_state_dict(load_file(directory / WEIGHTS_FILE), strict=True)
    return model.eval(), AutoTokenizer.from_pretrained(directory)
