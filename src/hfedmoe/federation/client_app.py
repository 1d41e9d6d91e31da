"""The Flower ClientApp: unpack the request, run the algorithm's local training, pack the reply.

A client process keeps a cache of its tokenised partitions, of one resident model and of its
cost model (all derived from the config alone), so it does not rebuild them every round: each
request's weights are copied into the resident model in place (no copy of the model per client
and round). Nothing here is shared with the server: the client sees only what arrives in the
message and in its Context. Weights a request leaves out (a strict client's unheld experts)
keep whatever the resident model last held; the algorithms that leave them out never route to
them.

Its device (``hfedmoe.budget``): the tier named by the node config's ``device-tier``, else the
one the config assigns to its partition. Before the first round the server asks every node for
its budget (a ``query.budget`` message); a train request asking for more experts per batch than
the device can hold fails with :class:`~hfedmoe.budget.BudgetExceeded` and contributes nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Context, Error, Message
from flwr.clientapp import ClientApp
from transformers import PreTrainedModel

from hfedmoe.algorithms import FederatedAlgorithm, build_algorithm
from hfedmoe.algorithms.mechanics.uploads import UploadSpec
from hfedmoe.budget import BudgetExceeded, CostModels, assign_tiers, check_request
from hfedmoe.data.tokenized import TokenizedDataset
from hfedmoe.federation import faults, wire
from hfedmoe.federation.workload import (
    ClientSource,
    OwnSource,
    client_model,
    client_source,
    label_names,
)
from hfedmoe.foundation.config import ATTACK_KINDS, DeviceTier, ExperimentConfig
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.foundation.memory import return_freed_memory
from hfedmoe.foundation.seeding import CLIENT_TRAIN, rng_for, seed_torch
from hfedmoe.model.state import held_bytes, load_shared_state, swapped_in
from hfedmoe.training import evaluate

app = ClientApp()

#: the token counts an algorithm reports (metric name) -> the FLOPs metric they become
TOKENS_TO_FLOPS = {
    "forward_tokens": "extra_flops_predicted",
    "overlapped_tokens": "overlapped_flops_predicted",
}


@dataclass(frozen=True)
class _Node:
    """What a message's Context says about this node: the run's config, its client (partition
    id), the number of partitions and its own data path, if it names one."""

    cfg_json: str
    partition_id: int
    num_partitions: int
    data_path: str | None

    @property
    def cfg(self) -> ExperimentConfig:
        return _config(self.cfg_json)

    def data(self, held_out: bool = False) -> TokenizedDataset:
        """Its rows to train on, or (``held_out``) to evaluate on."""
        return _data(
            self.cfg_json, self.partition_id, self.num_partitions, self.data_path, held_out
        )


def _node(context: Context, working: bool = True) -> _Node:
    """This node, from ``context``; ``working``: it is about to train or evaluate, so torch
    takes the config's threads."""
    path = context.node_config.get("data-path")  # --node-config "data-path='...'"
    node = _Node(
        str(context.run_config[wire.RUN_CONFIG]),
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        None if path is None else str(path),
    )
    if working:
        if node.cfg.trim_memory:
            return_freed_memory()
        if node.cfg.threads:
            torch.set_num_threads(node.cfg.threads)
    return node


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = _node(context)
    cfg_json, cfg, partition_id = node.cfg_json, node.cfg, node.partition_id
    request, server_round = wire.unpack_request(msg.content)

    tier = _tier(cfg_json, partition_id, context.node_config.get("device-tier"))
    request.device = tier
    algorithm = _algorithm(cfg_json)
    price = algorithm.priced(_cost_models(cfg_json), request)
    try:
        check_request(price, tier)
    except BudgetExceeded as exc:  # the round fails for this client; the server counts it
        return Message(Error(code=wire.BUDGET_EXCEEDED, reason=str(exc)), reply_to=msg)

    fault = faults.planned_fault(cfg, server_round, partition_id)  # injected faults (tests)
    if fault == "dropout":
        raise faults.Dropout
    if fault == "exception":
        raise faults.InjectedFault(
            f"injected fault: partition {partition_id}, round {server_round}"
        )
    if fault == "hang":
        faults.hang()
    if fault == "crash":
        faults.crash()
    data = node.data()
    model = _architecture(cfg_json)  # resident: the request's weights are loaded into it
    sent = request.weights
    seed_torch(cfg.seed, CLIENT_TRAIN, server_round, partition_id)  # dropout
    rng = rng_for(cfg.seed, CLIENT_TRAIN, server_round, partition_id)  # batch order
    if wire.MEMORY in context.state.array_records:  # what this node kept from its last round
        request.memory = context.state.array_records[wire.MEMORY].to_torch_state_dict()
    update = algorithm.train_client(model, data, request, rng)
    if cfg.privacy.local:  # local DP: noised before it leaves
        update = algorithm.noised(update, sent, server_round, partition_id)
    if request.memory:
        context.state[wire.MEMORY] = ArrayRecord(request.memory)
    update.metrics["memory_predicted_bytes"] = float(price.model.step_extra_bytes(price.experts))
    update.metrics["step_flops_predicted"] = price.model.predict(price.experts).step_flops
    # the weights it held while training (FLUX measures its customised model's itself)
    update.metrics.setdefault("memory_held_bytes", float(held_bytes(model)))
    # forward passes besides training: on the round's critical path, or overlapping the
    # server's aggregation (FLUX's stale profiling), as tokens -> FLOPs by the cost model
    for tokens, flops in TOKENS_TO_FLOPS.items():
        if tokens in update.metrics:
            update.metrics[flops] = price.model.forward_flops * update.metrics.pop(tokens)
    if fault == "deadline":
        faults.reply_late(cfg.federation.round_timeout or 0.0)  # after the deadline
    elif fault in ATTACK_KINDS:
        spec = _spec(cfg_json)
        refs = faults.references(update, spec, sent)
        update = faults.attack(update, fault, refs, spec, cfg, server_round, partition_id)
    elif fault is not None:
        update = faults.corrupt(update, fault, sent)
    by_reference = bool(context.run_config.get(wire.BY_REFERENCE, False))
    return Message(wire.pack_update(update, partition_id, by_reference), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """The global model on this client's own held-out share (``data.client_test_fraction``),
    for the server's federated evaluation (``eval.mode``)."""
    node = _node(context)
    cfg_json, cfg, partition_id = node.cfg_json, node.cfg, node.partition_id
    request, _ = wire.unpack_request(msg.content)
    data = node.data(held_out=True)
    model = _architecture(cfg_json)  # resident: the next train request loads its own weights
    load_shared_state(model, request.weights)
    if len(data) == 0:  # a partition too small to hold a row out: nothing to say
        return Message(
            wire.pack_evaluation(wire.ClientEvaluation(partition_id, 0.0, 0.0, 0)), reply_to=msg
        )
    result = evaluate(model, data, cfg.eval.batch_size, cfg.train.device)
    personal_accuracy = personal_loss = None
    if wire.MEMORY in context.state.array_records:  # its personal model, where it keeps one
        memory = context.state.array_records[wire.MEMORY].to_torch_state_dict()
        personal = _bound_algorithm(cfg_json).personal_weights(request.weights, memory)
        if personal:
            with swapped_in(model, personal):
                own = evaluate(model, data, cfg.eval.batch_size, cfg.train.device)
            personal_accuracy, personal_loss = own.accuracy, own.loss
    evaluation = wire.ClientEvaluation(
        partition_id, result.accuracy, result.loss, len(data), personal_accuracy, personal_loss
    )
    return Message(wire.pack_evaluation(evaluation), reply_to=msg)


@app.query("budget")
def budget(msg: Message, context: Context) -> Message:
    """This node's device and C_budget, for the server before round 1."""
    node = _node(context, working=False)
    tier = _tier(node.cfg_json, node.partition_id, context.node_config.get("device-tier"))
    costs = _cost_models(node.cfg_json)
    reply = wire.DeviceReport(
        partition_id=node.partition_id,
        tier="" if tier is None else tier.name,
        memory_bytes=0 if tier is None else int(tier.memory),
        expert_budget=_algorithm(node.cfg_json).device_budget(costs, tier),
        num_experts=costs.at().num_experts,
        num_partitions=node.num_partitions,
        num_examples=len(node.data()),
    )
    return Message(wire.pack_device(reply), reply_to=msg)


@functools.lru_cache(maxsize=4)
def _config(text: str) -> ExperimentConfig:
    return ExperimentConfig.from_json(text)


@functools.lru_cache(maxsize=64)
def _data(
    cfg_json: str,
    partition_id: int,
    num_partitions: int,
    data_path: str | None = None,
    held_out: bool = False,
) -> TokenizedDataset:
    """The client's rows it trains on, or (``held_out``) those it evaluates on."""
    source = _source(cfg_json, num_partitions)
    return source.partition(_config(cfg_json), partition_id, data_path, held_out)


@functools.lru_cache(maxsize=2)
def _source(cfg_json: str, num_partitions: int) -> ClientSource | OwnSource:
    return client_source(_config(cfg_json), num_partitions)


@functools.lru_cache(maxsize=2)
def _architecture(cfg_json: str) -> PreTrainedModel:
    cfg = _config(cfg_json)
    return client_model(cfg, label_names(cfg))


@functools.lru_cache(maxsize=4)
def _algorithm(cfg_json: str) -> FederatedAlgorithm:
    """The client side of the algorithm (it keeps no state between rounds on a client)."""
    return build_algorithm(_config(cfg_json))


@functools.lru_cache(maxsize=2)
def _bound_algorithm(cfg_json: str) -> FederatedAlgorithm:
    """The algorithm bound to the model's layout, as the server binds it: what a client needs
    to build its personal model from what its node keeps."""
    algorithm = build_algorithm(_config(cfg_json))
    algorithm.bind(_architecture(cfg_json))
    return algorithm


@functools.lru_cache(maxsize=2)
def _spec(cfg_json: str) -> UploadSpec:
    """What this client may send (an attacker reads the declared ranges to stay within them)."""
    return _algorithm(cfg_json).upload_spec(_architecture(cfg_json))


@functools.lru_cache(maxsize=2)
def _cost_models(cfg_json: str) -> CostModels:
    """Measured on the resident model (one forward pass each; no weight changes), not a copy."""
    return CostModels(_architecture(cfg_json), _config(cfg_json))


@functools.lru_cache(maxsize=64)
def _tier(cfg_json: str, partition_id: int, name: object = None) -> DeviceTier | None:
    cfg = _config(cfg_json)
    if name is None:
        return assign_tiers(cfg)[partition_id]
    tiers = {t.name: t for t in cfg.devices.tiers}
    if str(name) not in tiers:
        raise ConfigError(f"node config device-tier: unknown tier '{name}'")
    return tiers[str(name)]
