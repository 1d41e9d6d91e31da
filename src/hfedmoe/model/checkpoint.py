"""The checkpoint format: a directory that rebuilds the model without the original base model.

::

    model.safetensors   the state dict (a tied LM head stored once)
    config.json         the Hugging Face config of the architecture (with label names)
    tokenizer files
    hfedmoe.json        {"format_version", "task", "model": the [model] config section}
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hfedmoe.foundation.config import ModelConfig, Task
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.model.factory import META_FILE, WEIGHTS_FILE, build_model
from hfedmoe.model.quantize import dequantized_state, is_quantized
from hfedmoe.model.sources import model_dir as resolve_model_dir

FORMAT_VERSION = 1
BUILD_FILE = "build.json"


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: ModelConfig,
    directory: str | Path,
    task: Task,
    extra: dict | None = None,
) -> Path:
    """Write a self-contained checkpoint; atomic: a temporary folder renamed into place.

    ``extra`` (a built model's recipe and measures) goes to ``build.json`` and its
    ``construction`` key into ``hfedmoe.json`` (it marks the classifier head as untrained).
    """
    directory = Path(directory)
    if directory.exists():
        raise HFedMoEError(f"checkpoint directory '{directory}' already exists; not overwriting")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        if is_quantized(model):  # store the base dequantised: loads without bitsandbytes
            model, cfg = _dequantized(model, cfg, task)
        # save_model stores a tied tensor (an LM head sharing the embedding) once
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"format_version": FORMAT_VERSION, "task": task, "model": cfg.model_dump()}
        if extra is not None:
            meta["construction"] = extra["construction"]
            (tmp / BUILD_FILE).write_text(json.dumps(extra, indent=2))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _dequantized(
    model: PreTrainedModel, cfg: ModelConfig, task: Task
) -> tuple[PreTrainedModel, ModelConfig]:
    """The same model on an fp32 base: its state with the quantised weights dequantised."""
    assert cfg.lora is not None
    plain = cfg.model_copy(
        update={"lora": cfg.lora.model_copy(update={"quantize": None}), "frozen_dtype": "fp32"}
    )
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    copy = build_model(
        plain,
        task,
        labels if task == "classification" else [],
        seed=0,
        pretrained=False,
        model_dir=resolve_model_dir(cfg.name_or_path),
    )
    copy.load_state_dict(dequantized_state(model), strict=True)
    return copy, plain


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
    task = meta["task"]
    labels: list[str] = []
    if task == "classification":
        config = AutoConfig.from_pretrained(directory)
        labels = [config.id2label[i] for i in range(config.num_labels)]
    model = build_model(cfg, task, labels, seed=0, pretrained=False, model_dir=directory)
    missing, unexpected = load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    assert not missing and not unexpected
    return model.eval(), AutoTokenizer.from_pretrained(directory)
