"""The workload of an experiment: the model and the data each party builds from the config.

Both the server (global model, test and validation splits) and each client (its partition)
call these; a client never receives data from the server, it rebuilds its own partition from
the seed (out of the training rows the validation split leaves, as the server does). With
``data.clients = "own"`` nothing is partitioned: each client reads its own file and only it,
and the server reads only its test file (``data.test_path``).
(``data.task`` in the config says what the model learns: classification, language modelling or
multiple choice.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfedmoe.construction import ensure_prepared
from hfedmoe.data.datasets import SERVER, load_dataset, read_own
from hfedmoe.data.partition import (
    client_test_split,
    held_out_count,
    partition_indices,
    partition_key,
)
from hfedmoe.data.text import TextDataset
from hfedmoe.data.tokenized import TokenizedDataset, tokenize_for
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.model import build_model, load_tokenizer
from hfedmoe.model.state import share_frozen_base
from hfedmoe.training.personal import key_shares


@dataclass(frozen=True)
class ServerWorkload:
    """What the server holds: the global model, the tokenizer, the test split and, with
    ``data.validation_fraction``, the validation split."""

    model: PreTrainedModel  # the initial global model (pretrained base, upcycled)
    tokenizer: PreTrainedTokenizerBase
    test: TokenizedDataset | None  # None: no test data here (eval.mode = "federated", own data)
    label_names: tuple[str, ...]
    test_keys: np.ndarray  # each test row's partition key (label or group)
    client_shares: np.ndarray  # (C, K) each client's share of each key (per-client views)
    #: |D_c| of every client, as the server partitioned the data; None where it did not (own
    #: data: each node declares its size before round 1)
    partition_sizes: tuple[int, ...] | None
    validation: TokenizedDataset | None = None  # rows no client trains on; None without


def server_workload(cfg: ExperimentConfig) -> ServerWorkload:
    if cfg.data.clients == "own":
        return _own_data_server(cfg)
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
    share_frozen_base(model, _recipe(cfg, split.train.label_names))
    test = tokenize_for(cfg, split.test, tokenizer)
    keys = partition_key(split.train, cfg.data)
    test_keys = partition_key(split.test, cfg.data)
    num_keys = int(max(keys.max(initial=0), test_keys.max(initial=0))) + 1
    parts = partitions(cfg, split.train, cfg.federation.num_clients)
    shares = key_shares(parts, keys, num_keys)
    held = cfg.data.client_test_fraction  # what each client keeps back to evaluate on
    sizes = tuple(len(p) - held_out_count(len(p), held) for p in parts)
    names = split.train.label_names
    validation = (
        None if split.validation is None else tokenize_for(cfg, split.validation, tokenizer)
    )
    return ServerWorkload(model, tokenizer, test, names, test_keys, shares, sizes, validation)


def _own_data_server(cfg: ExperimentConfig) -> ServerWorkload:
    """The server of a federation whose clients hold their own data: the model, the test
    file, the class names from the config; no client's size or label mix is known here, so
    the per-client views of the global model are left empty."""
    names = tuple(cfg.data.label_names or ())
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(
        cfg.model, cfg.data.task, names, seed=cfg.seed, pretrained=True, model_dir=None
    )  # model.construction is 'upcycle' with own data (the config says why)
    share_frozen_base(model, _recipe(cfg, names))
    shares = np.zeros((cfg.federation.num_clients, max(len(names), 1)))
    if cfg.data.test_path is None:  # federated evaluation alone: the clients' shares
        return ServerWorkload(model, tokenizer, None, names, np.zeros(0, int), shares, None)
    cap = cfg.data.max_test_examples
    test_rows = read_own(cfg.data, cfg.data.test_path, "data.test_path", SERVER, cap)
    test_keys = partition_key(test_rows, cfg.data)
    shares = np.zeros((cfg.federation.num_clients, int(test_keys.max(initial=0)) + 1))
    test = tokenize_for(cfg, test_rows, tokenizer)
    return ServerWorkload(model, tokenizer, test, names, test_keys, shares, None)


@dataclass(frozen=True)
class OwnSource:
    """Where clients with their own data read it (``data.clients = "own"``): the node's
    ``data-path``, else ``data.client_paths[partition]``."""

    tokenizer: PreTrainedTokenizerBase

    def partition(
        self,
        cfg: ExperimentConfig,
        partition_id: int,
        data_path: str | None = None,
        held_out: bool = False,
    ) -> TokenizedDataset:
        """The client's own rows it trains on (``held_out``: those it evaluates on)."""
        paths = cfg.data.client_paths
        if data_path is not None:
            path, field = data_path, "data-path (the node config)"
        elif paths is not None and 0 <= partition_id < len(paths):
            path, field = paths[partition_id], f"data.client_paths[{partition_id}]"
        else:
            raise ConfigError(
                f"data-path: client {partition_id} has no data of its own (give its SuperNode "
                "--node-config \"data-path='...'\", or data.client_paths)"
            )
        rows = read_own(cfg.data, path, field, partition_id, cfg.data.max_train_examples)
        return tokenize_for(
            cfg, rows.subset(_kept(cfg, partition_id, len(rows), held_out)), self.tokenizer
        )


@dataclass(frozen=True)
class ClientSource:
    """What every partition a client process trains is cut from: the training split, its
    partitions and the tokenizer, loaded once per process rather than once per partition (a
    process that runs many clients tokenised each in about 1.3 s, half of it reloading and
    repartitioning the split)."""

    train: TextDataset
    parts: list[np.ndarray]
    tokenizer: PreTrainedTokenizerBase

    def partition(
        self,
        cfg: ExperimentConfig,
        partition_id: int,
        data_path: str | None = None,
        held_out: bool = False,
    ) -> TokenizedDataset:
        """Client ``partition_id``'s share of the training split, tokenised: the rows it trains
        on, or (``held_out``) the ones ``data.client_test_fraction`` keeps back for it to
        evaluate on (a node's ``data_path`` is for own data only)."""
        if data_path is not None:
            raise ConfigError(
                "data-path: this node names its own data, but data.clients is 'partition' "
                "(set data.clients = 'own', or drop data-path from the node config)"
            )
        rows = self.parts[partition_id]
        rows = rows[_kept(cfg, partition_id, len(rows), held_out)]
        return tokenize_for(cfg, self.train.subset(rows), self.tokenizer)


def _kept(cfg: ExperimentConfig, partition_id: int, rows: int, held_out: bool) -> np.ndarray:
    """Positions of a client's ``rows`` it trains on, or (``held_out``) those
    ``data.client_test_fraction`` keeps back for it to evaluate on (none without one)."""
    fraction = cfg.data.client_test_fraction
    return client_test_split(rows, fraction, cfg.seed, partition_id)[held_out]


def client_source(cfg: ExperimentConfig, num_partitions: int) -> ClientSource | OwnSource:
    if cfg.data.clients == "own":
        return OwnSource(load_tokenizer(cfg.model))
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
    model = build_model(
        cfg.model,
        cfg.data.task,
        label_names,
        seed=cfg.seed,
        pretrained=pretrained,
        model_dir=starting_model_dir(cfg) if pretrained else None,
    )
    share_frozen_base(model, _recipe(cfg, label_names))  # with the server's, in one process
    return model


def _recipe(cfg: ExperimentConfig, label_names: tuple[str, ...] | list[str]) -> str:
    """What a model's frozen base is built from: two models of one recipe hold equal bases."""
    return json.dumps(
        [cfg.model.model_dump(mode="json"), cfg.data.task, list(label_names), cfg.seed]
    )


def starting_model_dir(cfg: ExperimentConfig) -> Path | None:
    """The built model a specialising ``model.construction`` starts from (built on first use
    and cached), or None: the model comes from ``model.name_or_path`` as it is."""
    if cfg.model.construction == "upcycle":
        return None
    return ensure_prepared(cfg)


def label_names(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The class names: the training split's, or the config's where clients hold their own
    data (the party asking reads no one's training data)."""
    if cfg.data.clients == "own":
        return tuple(cfg.data.label_names or ())
    return load_dataset(cfg.data, cfg.seed).train.label_names
