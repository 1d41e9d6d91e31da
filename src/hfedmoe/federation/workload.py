"""The workload of an experiment: the model and the data each party builds from the config.

Both the server (global model, test and validation splits) and each client (its partition)
call these; a client never receives data from the server, it rebuilds its own partition from
the seed (out of the training rows the validation split leaves, as the server does).
(``data.task`` in the config says what the model learns: classification, language modelling or
multiple choice.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfedmoe.construction import ensure_prepared
from hfedmoe.data.datasets import load_dataset
from hfedmoe.data.partition import partition_indices, partition_key
from hfedmoe.data.text import TextDataset
from hfedmoe.data.tokenized import TokenizedDataset, tokenize_for
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.model import build_model, load_tokenizer
from hfedmoe.training.personal import key_shares


@dataclass(frozen=True)
class ServerWorkload:
    """What the server holds: the global model, the tokenizer, the test split and, with
    ``data.validation_fraction``, the validation split."""

    model: PreTrainedModel  # the initial global model (pretrained base, upcycled)
    tokenizer: PreTrainedTokenizerBase
    test: TokenizedDataset
    label_names: tuple[str, ...]
    test_keys: np.ndarray  # each test row's partition key (label or group)
    client_shares: np.ndarray  # (C, K) each client's share of each key (per-client views)
    partition_sizes: tuple[int, ...]  # |D_c| of every client, as the server partitioned the data
    validation: TokenizedDataset | None = None  # rows no client trains on; None without


def server_workload(cfg: ExperimentConfig) -> ServerWorkload:
    split = load_dataset(cfg.data, cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(
        cfg.model,
        cfg.data.task,
        split.train.label_names,
        seed=cfg.seed,
        pretrained=True,
        model_dir=starting_model_dir(cfg),
    )
    test = tokenize_for(cfg, split.test, tokenizer)
    keys = partition_key(split.train, cfg.data)
    test_keys = partition_key(split.test, cfg.data)
    num_keys = int(max(keys.max(initial=0), test_keys.max(initial=0))) + 1
    parts = partitions(cfg, split.train, cfg.federation.num_clients)
    shares = key_shares(parts, keys, num_keys)
    sizes = tuple(len(p) for p in parts)
    names = split.train.label_names
    validation = (
        None if split.validation is None else tokenize_for(cfg, split.validation, tokenizer)
    )
    return ServerWorkload(model, tokenizer, test, names, test_keys, shares, sizes, validation)


@dataclass(frozen=True)
class ClientSource:
    """What every partition a client process trains is cut from: the training split, its
    partitions and the tokenizer, loaded once per process rather than once per partition (a
    process that runs many clients tokenised each in about 1.3 s, half of it reloading and
    repartitioning the split)."""

    train: TextDataset
    parts: list[np.ndarray]
    tokenizer: PreTrainedTokenizerBase

    def partition(self, cfg: ExperimentConfig, partition_id: int) -> TokenizedDataset:
        """Client ``partition_id``'s share of the training split, tokenised."""
        return tokenize_for(cfg, self.train.subset(self.parts[partition_id]), self.tokenizer)


def client_source(cfg: ExperimentConfig, num_partitions: int) -> ClientSource:
    train = load_dataset(cfg.data, cfg.seed).train
    return ClientSource(train, partitions(cfg, train, num_partitions), load_tokenizer(cfg.model))


def client_data(cfg: ExperimentConfig, partition_id: int, num_partitions: int) -> TokenizedDataset:
    """Client ``partition_id``'s share of the training split, tokenised."""
    return client_source(cfg, num_partitions).partition(cfg, partition_id)


def partitions(cfg: ExperimentConfig, train: TextDataset, num_partitions: int) -> list[np.ndarray]:
    """The rows of the training split each client holds (by partition id)."""
    keys = partition_key(train, cfg.data)
    return partition_indices(keys, num_partitions, cfg.data, cfg.seed)


def client_model(cfg: ExperimentConfig, label_names: tuple[str, ...]) -> PreTrainedModel:
    """The client's model. Full fine-tuning: the architecture with placeholder weights, the
    server's weights are loaded in. A frozen base (LoRA, MoE adapters): the same pretrained
    base the server builds, from the same checkpoint and seed; only the trainable tensors
    travel (``hfedmoe.model.state``)."""
    pretrained = cfg.model.frozen_base
    return build_model(
        cfg.model,
        cfg.data.task,
        label_names,
        seed=cfg.seed,
        pretrained=pretrained,
        model_dir=starting_model_dir(cfg) if pretrained else None,
    )


def starting_model_dir(cfg: ExperimentConfig) -> Path | None:
    """The built model a specialising ``model.construction`` starts from (built on first use
    and cached), or None: the model comes from ``model.name_or_path`` as it is."""
    if cfg.model.construction == "upcycle":
        return None
    return ensure_prepared(cfg)


def label_names(cfg: ExperimentConfig) -> tuple[str, ...]:
    return load_dataset(cfg.data, cfg.seed).train.label_names
