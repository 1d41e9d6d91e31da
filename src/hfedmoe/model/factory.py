"""One entry point to every model: the model type of the checkpoint and the task decide.

| checkpoint (``config.model_type``)  | classification        | language-modeling, multiple-choice |
| ----------------------------------- | --------------------- | ---------------------------------- |
| BERT-family encoder                 | upcycled + a new head | -                                  |
| Llama-style decoder (SmolLM2, ...)  | -                     | upcycled causal LM                 |
| native MoE family (Switch, Mixtral) | -                     | as trained (MC: decoders only)     |

The upcycling options of ``[model]`` (experts, top-k, layers, ...) apply to dense checkpoints;
a native MoE checkpoint keeps its own experts. ``[model.lora]`` applies to all.

A directory that hfedmoe saved (``hfedmoe.json`` beside the weights: a run's model, or a model
built by ``hfedmoe prepare``) starts a run with its own weights: its MoE shape must match
``[model]``, and a classifier keeps its head only when it was trained for the same labels.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, load_model
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from hfedmoe.foundation.config import ModelConfig, Task
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.model.frozen import hold_frozen_in
from hfedmoe.model.hf import SUPPORTED_MOE_FAMILIES, load_moe_model
from hfedmoe.model.lora import add_lora
from hfedmoe.model.sources import model_dir as resolve_model_dir
from hfedmoe.model.upcycle import LLAMA_LIKE
from hfedmoe.model.upcycled import build_causal_lm, build_classifier

#: which kinds of checkpoint each task can train
FITS = {
    "classification": ("encoder",),
    "language-modeling": ("decoder", "native MoE"),
    "multiple-choice": ("decoder", "native MoE"),
    "instruction": ("decoder", "native MoE"),
}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
WEIGHTS_FILE = "model.safetensors"
META_FILE = "hfedmoe.json"  # marks a directory hfedmoe saved (hfedmoe.model.checkpoint)
#: what must agree between ``[model]`` and a saved model that starts a run
SHAPE_KEYS = ("num_experts", "top_k", "moe_layers")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def model_kind(model_type: str) -> str | None:
    """ "encoder", "decoder" or "native MoE" for a supported ``config.model_type``, else None."""
    if model_type in SUPPORTED_MOE_FAMILIES:
        return "native MoE"
    if model_type in LLAMA_LIKE:
        return "decoder"
    return "encoder" if model_type == "bert" else None


def check_model_dir(directory: Path, task: Task, name: str) -> PretrainedConfig:
    """Everything a run needs from a local model directory, checked before anything is
    written: a readable config of a supported type that fits ``task``, weights, a tokenizer."""
    if not (directory / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: '{directory}' has no config.json")
    try:
        model_config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.name_or_path: '{directory}/config.json' is not a usable config ({first})"
        ) from None
    model_type = model_config.model_type
    kind = model_kind(model_type)
    if kind is None:
        known = ", ".join(["bert", *LLAMA_LIKE, *sorted(SUPPORTED_MOE_FAMILIES)])
        raise ConfigError(
            f"model.name_or_path: model type '{model_type}' is not supported (expected one of: "
            f"{known})"
        )
    if kind not in FITS[task]:
        raise ConfigError(
            f"data.task: '{task}' needs a {' or '.join(FITS[task])} model; "
            f"'{name}' is a {kind} ({model_type})"
        )
    if task in ("multiple-choice", "instruction") and getattr(
        model_config, "is_encoder_decoder", False
    ):
        raise ConfigError(
            f"data.task: '{task}' needs a decoder-only model; '{name}' is "
            f"an encoder-decoder ({model_type})"
        )
    for what, files in (("weights", WEIGHT_FILES), ("tokenizer", TOKENIZER_FILES)):
        if not any((directory / f).is_file() for f in files):
            raise ConfigError(
                f"model.name_or_path: '{directory}' has no {what} (expected one of: "
                f"{', '.join(files)})"
            )
    return model_config


def build_model(
    cfg: ModelConfig,
    task: Task,
    label_names: tuple[str, ...] | list[str] = (),
    *,
    seed: int,
    pretrained: bool = True,
    model_dir: str | Path | None = None,
) -> PreTrainedModel:
    """The model for ``task``; ``pretrained=False`` gives the architecture with random weights.
    With ``cfg.frozen_dtype = "bf16"`` its frozen base is held in bf16 (``model.frozen``)."""
    model = _build(cfg, task, label_names, seed=seed, pretrained=pretrained, model_dir=model_dir)
    if cfg.frozen_dtype == "bf16":
        hold_frozen_in(model)
    return model


def _build(
    cfg: ModelConfig,
    task: Task,
    label_names: tuple[str, ...] | list[str],
    *,
    seed: int,
    pretrained: bool,
    model_dir: str | Path | None,
) -> PreTrainedModel:
    directory = Path(model_dir) if model_dir else resolve_model_dir(cfg.name_or_path)
    kind = model_kind(check_model_dir(directory, task, cfg.name_or_path).model_type)
    if pretrained and (directory / META_FILE).is_file():
        return _from_saved(directory, cfg, task, label_names, seed)
    if kind == "native MoE" and cfg.moe_adapters is not None:
        raise ConfigError(
            f"model.moe_adapters: MoE adapters (FFT-MoE) go on a dense model; '{cfg.name_or_path}' "
            "is a native MoE (expected a BERT-family or Llama-style checkpoint)"
        )
    if kind == "native MoE":
        return load_moe_model(directory, lora=cfg.lora, pretrained=pretrained, seed=seed)
    if kind == "encoder":
        return build_classifier(
            cfg, label_names, seed=seed, pretrained=pretrained, model_dir=directory
        )
    return build_causal_lm(cfg, seed=seed, pretrained=pretrained, model_dir=directory)


def _from_saved(
    directory: Path, cfg: ModelConfig, task: Task, label_names, seed: int
) -> PreTrainedModel:
    """A model hfedmoe saved, as the starting point of a run (see the module docstring)."""
    meta = json.loads((directory / META_FILE).read_text())
    saved = ModelConfig.model_validate(meta["model"])
    for key in SHAPE_KEYS:
        if getattr(saved, key) != getattr(cfg, key):
            raise ConfigError(
                f"model.{key}: {getattr(cfg, key)!r} differs from the saved model's "
                f"{getattr(saved, key)!r} in '{directory}' (expected the same)"
            )
    if saved.lora is not None:
        raise ConfigError(
            f"model.name_or_path: '{directory}' holds LoRA adapters; a run can start from a "
            "saved model with full weights only"
        )
    if meta.get("task") != task:
        raise ConfigError(
            f"data.task: '{task}' differs from the saved model's '{meta.get('task')}' in "
            f"'{directory}'"
        )
    bare = cfg.model_copy(update={"lora": None, "construction": "upcycle", "frozen_dtype": "fp32"})
    model = build_model(bare, task, label_names, seed=seed, pretrained=False, model_dir=directory)
    keep_head = True
    if task == "classification":
        saved_labels = AutoConfig.from_pretrained(directory).id2label
        same = [saved_labels[i] for i in range(len(saved_labels))] == list(label_names)
        keep_head = same and meta.get("construction") is None  # a built model's head is untrained
    if keep_head:
        missing, unexpected = load_model(model, str(directory / WEIGHTS_FILE), strict=False)
    else:  # the body only; the head stays as the seed drew it (its shape may differ, too)
        prefix = model.base_model_prefix + "."
        body = {
            k: v for k, v in load_file(directory / WEIGHTS_FILE).items() if k.startswith(prefix)
        }
        missing, unexpected = model.load_state_dict(body, strict=False)
        missing = [k for k in missing if k.startswith(prefix)]
    if missing or unexpected:
        raise ConfigError(
            f"model.name_or_path: the weights in '{directory}' do not fit its config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return add_lora(model, cfg.lora) if cfg.lora is not None else model
