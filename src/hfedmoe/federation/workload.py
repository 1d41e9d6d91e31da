"""The workload of an experiment: the model and the data each party builds from the config.

Both the server (global model, test split) and each client (its partition) call these; a
client never receives data from the server, it rebuilds its own partition from the seed.
(``data.task`` in the config says what the model learns: classification, language modelling or
multiple choice.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfedmoe.data.datasets import load_dataset
from hfedmoe.data.partition import partition_indices, partition_key
from hfedmoe.data.text import TextDataset
from hfedmoe.data.tokenized import TokenizedDataset, tokenize, tokenize_choices
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.model import build_model, load_tokenizer


@dataclass(frozen=True)
class ServerWorkload:
    """What the server holds: the global model, the tokenizer and the test split."""

    model: PreTrainedModel  # the initial global model (pretrained base, upcycled)
    tokenizer: PreTrainedTokenizerBase
    test: TokenizedDataset
    label_names: tuple[str, ...]


def server_workload(cfg: ExperimentConfig) -> ServerWorkload:
    split = load_dataset(cfg.data, cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(
        cfg.model, cfg.data.task, split.train.label_names, seed=cfg.seed, pretrained=True
    )
    test = tokenize_for(cfg, split.test, tokenizer)
    return ServerWorkload(model, tokenizer, test, split.train.label_names)


def client_data(cfg: ExperimentConfig, partition_id: int, num_partitions: int) -> TokenizedDataset:
    """Client ``partition_id``'s share of the training split, tokenised."""
    split = load_dataset(cfg.data, cfg.seed)
    parts = partitions(cfg, split.train, num_partitions)
    tokenizer = load_tokenizer(cfg.model)
    return tokenize_for(cfg, split.train.subset(parts[partition_id]), tokenizer)


def partitions(cfg: ExperimentConfig, train: TextDataset, num_partitions: int) -> list[np.ndarray]:
    """The rows of the training split each client holds (by partition id)."""
    keys = partition_key(train, cfg.data)
    return partition_indices(keys, num_partitions, cfg.data, cfg.seed)


def client_model(cfg: ExperimentConfig, label_names: tuple[str, ...]) -> PreTrainedModel:
    """The client's model. Full fine-tuning: the architecture with placeholder weights, the
    server's weights are loaded in. A frozen base (LoRA): the same pretrained base the server
    builds, from the same checkpoint and seed; only the trainable tensors travel
    (``hfedmoe.model.state``)."""
    pretrained = cfg.model.lora is not None
    return build_model(cfg.model, cfg.data.task, label_names, seed=cfg.seed, pretrained=pretrained)


def tokenize_for(
    cfg: ExperimentConfig, data: TextDataset, tokenizer: PreTrainedTokenizerBase
) -> TokenizedDataset:
    """``data`` tokenised as the experiment's task needs it."""
    if cfg.data.task == "multiple-choice":
        return tokenize_choices(data, tokenizer, cfg.model.max_length)
    lm = cfg.data.task == "language-modeling"
    return tokenize(data, tokenizer, cfg.model.max_length, language_modeling=lm)


def label_names(cfg: ExperimentConfig) -> tuple[str, ...]:
    return load_dataset(cfg.data, cfg.seed).train.label_names
