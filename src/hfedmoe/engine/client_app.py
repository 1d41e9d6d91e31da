"""The Flower ClientApp: unpack the task, run the algorithm's local training, pack the reply.

A client process keeps a cache of its tokenised partition and of the model architecture (both
derived from the config alone), so it does not rebuild them every round. Nothing here is shared
with the server: the client sees only what arrives in the message and in its Context.
"""

from __future__ import annotations

import copy
import functools

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from transformers import PreTrainedModel

from hfedmoe.algorithms import build_algorithm
from hfedmoe.config import ExperimentConfig
from hfedmoe.data.tokenized import TokenizedDataset
from hfedmoe.engine import wire
from hfedmoe.seeding import CLIENT_TRAIN, rng_for, seed_torch
from hfedmoe.task import client_data, client_model, label_names

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg_json = str(context.run_config[wire.RUN_CONFIG])
    cfg = _config(cfg_json)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    task, server_round = wire.unpack_task(msg.content)

    data = _data(cfg_json, partition_id, num_partitions)
    model = copy.deepcopy(_architecture(cfg_json))
    seed_torch(cfg.seed, CLIENT_TRAIN, server_round, partition_id)  # dropout
    rng = rng_for(cfg.seed, CLIENT_TRAIN, server_round, partition_id)  # batch order
    update = build_algorithm(cfg).train_client(model, data, task, rng)
    return Message(wire.pack_update(update, partition_id), reply_to=msg)


@functools.lru_cache(maxsize=4)
def _config(text: str) -> ExperimentConfig:
    return ExperimentConfig.from_json(text)


@functools.lru_cache(maxsize=64)
def _data(cfg_json: str, partition_id: int, num_partitions: int) -> TokenizedDataset:
    return client_data(_config(cfg_json), partition_id, num_partitions)


@functools.lru_cache(maxsize=2)
def _architecture(cfg_json: str) -> PreTrainedModel:
    cfg = _config(cfg_json)
    return client_model(cfg, label_names(cfg))
