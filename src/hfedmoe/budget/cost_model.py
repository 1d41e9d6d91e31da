"""Device budgets (METHOD.md §6): from a device profile to C_budget(c), with a cost model.

A client's device is a :class:`~hfedmoe.foundation.config.DeviceTier` (memory bytes, optionally
FLOP/s and a round deadline; :mod:`hfedmoe.budget.devices` says which client has which). The
:class:`CostModel` of a model and a training setup predicts, for a number C of experts trained
per batch:

* peak memory = resident weights
  + 3 x trainable bytes (gradient + two Adam moments) of the shared parameters and routers
  + 3 x trainable bytes of each of the C trained experts
  + the activations the forward pass saves for backward (measured on a probe batch)
  + the backward pass's transient buffers (:data:`BACKWARD_TRANSIENT` x activations);
* step FLOPs = tokens x (forward + backward FLOPs per token), from the expert interface's
  accounting, with the C trained experts' weight gradients counted;
* round seconds = local steps x step FLOPs / the device's FLOP/s.

C_budget(c) is the largest C whose predicted peak fits the device's memory and whose round fits
its deadline. Two facts of the implementation make this bound hold: an expert outside E_active
gets no weight gradient (``ExpertModel.update_only``), and the optimizer drops the moments of an
expert when it leaves E_active (``ExpertAdamW``), so at most C experts carry optimizer state.
Fused expert tensors (transformers' 3-D experts) get gradients and moments as whole tensors, so
on such models training any expert costs as much as training all of them: C_budget is then all
or nothing, and the cost model says so rather than pretending otherwise.

The model is checked against measured peak memory (RSS) and counted FLOPs in
tests/test_budget.py; docs/BUDGETS.md gives the numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hfedmoe.foundation.config import DeviceTier, ExperimentConfig
from hfedmoe.foundation.errors import ConfigError, HFedMoEError
from hfedmoe.model.adapters import routing_top_k
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.state import experts_only as only_experts_train
from hfedmoe.training.loop import activation_checkpointing, autocast_for
from hfedmoe.training.objective import task_loss

#: Backward's transient memory (gradients of activations, the softmax of the loss, allocator
#: slack) as a multiple of the saved activations; measured on MiniLM-MoE and SmolLM2-MoE
#: (docs/BUDGETS.md), rounded up.
BACKWARD_TRANSIENT = 0.5

#: Bytes of gradient + two Adam moments per trainable byte.
TRAINING_STATE_FACTOR = 3


class BudgetExceeded(HFedMoEError):
    """A client was asked to do more than its device allows (it fails the round)."""


@dataclass(frozen=True)
class Cost:
    """Predicted cost of one client-round training ``experts`` experts per batch."""

    experts: int
    peak_bytes: int
    step_flops: float
    round_seconds: float | None  # None when the device's FLOP/s are unknown


@dataclass(frozen=True)
class CostModel:
    """The cost of training a given number of experts per batch, for one model and setup."""

    num_experts: int  # L x E, the expert pool
    resident_bytes: int  # every parameter and buffer of the model
    expert_resident_bytes: int  # weights of one expert (largest layer's)
    shared_train_bytes: int  # trainable bytes outside experts: shared parameters and routers
    expert_train_bytes: int  # trainable bytes of one expert (largest layer's)
    fused: bool  # experts stored as fused tensors: gradients and moments come whole
    activation_bytes: int  # saved for backward by one batch of the configured size
    tokens_per_step: int  # batch_size x max_length (an upper bound: batches are not padded)
    local_steps: int
    forward_flops: float  # per token
    backward_flops_none: float  # per token, no expert trained
    backward_flops_all: float  # per token, every expert trained

    def training_bytes(self, experts: int) -> int:
        """Gradients + optimizer state of the shared parameters, routers and ``experts``."""
        trained = self.num_experts if (self.fused and experts > 0) else experts
        return TRAINING_STATE_FACTOR * (self.shared_train_bytes + trained * self.expert_train_bytes)

    def step_extra_bytes(self, experts: int) -> int:
        """What training adds on top of the resident weights (what a client measures)."""
        transient = int(BACKWARD_TRANSIENT * self.activation_bytes)
        return self.training_bytes(experts) + self.activation_bytes + transient

    def resident(self, held: int | None = None) -> int:
        """Bytes of the weights a client holds with ``held`` experts resident (default all; a
        merged expert counts as one)."""
        unheld = 0 if (held is None or self.fused) else self.num_experts - held
        return self.resident_bytes - unheld * self.expert_resident_bytes

    def predict(
        self, experts: int, flops_per_second: float | None = None, held: int | None = None
    ) -> Cost:
        """The cost of training ``experts`` per batch; ``held``: experts resident (strict mode,
        default all)."""
        if not 0 <= experts <= self.num_experts:
            raise ValueError(f"experts must be in 0..{self.num_experts}, got {experts}")
        resident = self.resident(held)
        fraction = experts / self.num_experts
        backward = self.backward_flops_none + fraction * (
            self.backward_flops_all - self.backward_flops_none
        )
        step_flops = self.tokens_per_step * (self.forward_flops + backward)
        seconds = None if not flops_per_second else self.local_steps * step_flops / flops_per_second
        return Cost(experts, resident + self.step_extra_bytes(experts), step_flops, seconds)

    def expert_budget(self, tier: DeviceTier | None, strict: bool = False) -> int:
        """C_budget: the most experts per batch that fit ``tier`` (all, for None)."""
        if tier is None:
            return self.num_experts
        best = -1
        for c in range(self.num_experts + 1):
            if self.fits(c, tier, strict):
                best = c
        return best

    def fits(
        self, experts: int, tier: DeviceTier, strict: bool = False, held: int | None = None
    ) -> bool:
        """Whether training ``experts`` per batch fits ``tier``, with ``held`` experts resident
        (default: all; ``strict``: only the trained ones)."""
        if held is None and strict:
            held = experts
        cost = self.predict(experts, tier.flops, held=held)
        on_time = tier.deadline_seconds is None or cost.round_seconds <= tier.deadline_seconds
        return cost.peak_bytes <= tier.memory and on_time


def build_cost_model(model: nn.Module, cfg: ExperimentConfig) -> CostModel:
    """The cost model of ``model`` trained as ``cfg.train`` says, on ``cfg.model.max_length``
    tokens per example. Runs one forward pass on a probe batch to measure activations."""
    em = ExpertModel(model)
    L, E = em.shape
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expert_entries = em.expert_entries()
    expert_names = {x.state_name for es in expert_entries.values() for x in es}
    params = dict(model.named_parameters())
    shared_train = sum(
        _nbytes(p) for n, p in params.items() if id(p) in trainable and n not in expert_names
    )
    expert_train = max(
        sum(_nbytes(x.take(params[x.state_name])) for x in expert_entries[(layer, 0)])
        for layer in range(L)
    )
    expert_resident = max(em.param_bytes().per_expert)
    resident = sum(_nbytes(p) for p in model.parameters()) + sum(
        _nbytes(b) for b in model.buffers()
    )
    forward, backward_none = em.flops_per_token(torch.zeros(L, E, dtype=torch.bool))
    _, backward_all = em.flops_per_token(torch.ones(L, E, dtype=torch.bool))
    batch = probe_batch(model, cfg)
    return CostModel(
        num_experts=L * E,
        resident_bytes=resident,
        expert_resident_bytes=expert_resident,
        shared_train_bytes=shared_train,
        expert_train_bytes=expert_train,
        fused=any(layer.fused for layer in em.layers),
        activation_bytes=_activation_bytes(model, batch, cfg),
        tokens_per_step=cfg.train.batch_size * cfg.model.max_length,
        local_steps=cfg.train.local_steps,
        forward_flops=forward,
        backward_flops_none=backward_none,
        backward_flops_all=backward_all,
    )


class CostModels:
    """The cost models of one (resident) model: ``at()`` as configured, ``at(k)`` with every
    MoE adapter routing to its top k (FFT-MoE's k(c)), ``at(experts_only=True)`` with routers
    and shared parameters frozen (FLUX). Each is measured once, on first use."""

    def __init__(self, model: nn.Module, cfg: ExperimentConfig):
        self.model, self.cfg = model, cfg
        self._built: dict[tuple[int | None, bool], CostModel] = {}

    def at(self, top_k: int | None = None, experts_only: bool = False) -> CostModel:
        key = (top_k, experts_only)
        if key not in self._built:
            # the probe's forward pass must not move the RNG that seeds a client's dropout
            with contextlib.ExitStack() as stack, torch.random.fork_rng(devices=[]):
                if top_k is not None:
                    stack.enter_context(routing_top_k(self.model, top_k))
                if experts_only:
                    em = ExpertModel(self.model)
                    names = {n for layer in em.layers for n in layer.expert_param_names}
                    ids = {id(p) for n, p in self.model.named_parameters() if n in names}
                    stack.enter_context(only_experts_train(self.model, ids))
                self._built[key] = build_cost_model(self.model, self.cfg)
        return self._built[key]


def probe_batch(model: nn.Module, cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """A full batch (``batch_size`` x ``max_length`` random tokens) of the run's task."""
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = model.get_input_embeddings().num_embeddings
    shape = (cfg.train.batch_size, cfg.model.max_length)
    ids = torch.randint(0, vocab, shape, generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if cfg.data.task != "classification":
        batch["labels"] = ids
    else:
        batch["labels"] = torch.zeros(shape[0], dtype=torch.long)
    return batch


def _activation_bytes(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: ExperimentConfig
) -> int:
    """What one step's activations hold at their peak. With activation checkpointing: the
    layers' inputs the forward pass keeps, plus the largest layer's activations, which the
    backward pass recomputes one layer at a time."""
    precision = cfg.train.precision
    if not cfg.train.activation_checkpointing:
        return saved_activation_bytes(model, batch, precision)
    largest = saved_activation_bytes(model, batch, precision, largest_layer=True)
    return saved_activation_bytes(model, batch, precision, checkpointing=True) + largest


def saved_activation_bytes(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    precision: str = "fp32",
    checkpointing: bool = False,
    largest_layer: bool = False,
) -> int:
    """Bytes the forward pass of ``batch`` keeps for backward (parameters not counted), under
    the training's precision (``train.precision = "bf16"``: bf16 autocast, as the clients
    train, so bf16 activations and the bf16 copies of weights autocast saves are counted).

    Measured with autograd's saved-tensor hooks, each storage counted once; written here
    because torch has no CPU memory statistics. With ``checkpointing``
    (``train.activation_checkpointing``), what the checkpointed layers save is held by torch's
    checkpoint instead of these hooks and recomputed in the backward pass: what is counted is
    what stays between layers. With ``largest_layer``: the most any one of the layers that
    checkpointing recomputes (transformers' ``GradientCheckpointingLayer``) saves, instead of
    the total.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0
    largest, started = 0, {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
        # detached: the same storage kept alive as long as the graph (so no pointer is reused
        # and counted as seen), but no grad_fn. A saved output returned as it is would hold its
        # own graph node, a cycle in C++ that no collector frees: every probe's activations
        # stayed resident (0.6-1.1 GB each on a SmolLM2-MoE; FFT-MoE measures five)
        return t.detach()

    def enter(module: nn.Module, args: tuple) -> None:
        started[id(module)] = total

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        nonlocal largest
        largest = max(largest, total - started.pop(id(module)))

    handles = []
    if largest_layer:
        for layer in model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                handles += [
                    layer.register_forward_pre_hook(enter),
                    layer.register_forward_hook(leave),
                ]
    was_training = model.training
    model.train()
    autocast = autocast_for(precision, next(model.parameters()).device)
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            autocast,
            activation_checkpointing(model, checkpointing),
        ):
            loss = task_loss(model, batch)
        del loss
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return largest if largest_layer else total


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class Price:
    """What one train request asks of a client's device: ``experts`` trained per batch with
    ``held`` experts resident (None: all), priced by ``model``."""

    model: CostModel
    experts: int
    held: int | None = None


def check_request(price: Price, tier: DeviceTier | None) -> None:
    """Raise :class:`BudgetExceeded` if ``price`` does not fit ``tier``."""
    if tier is None or price.model.fits(price.experts, tier, held=price.held):
        return
    strict = price.held is not None and price.held == price.experts
    limit = price.model.expert_budget(tier, strict)
    raise BudgetExceeded(
        f"device '{tier.name}' cannot train {price.experts} experts per batch "
        f"({_shortfall(price.model, tier, price.experts, price.held)}); its budget is "
        f"{max(limit, 0)}"
    )


def minimum_budget(num_layers: int, strict: bool) -> int:
    """The smallest useful C_budget: one expert (strict routing: one per MoE layer)."""
    return num_layers if strict else 1


def check_tiers(
    cfg: ExperimentConfig,
    cost_model: CostModel,
    num_layers: int,
    strict: bool,
    budget_of: Callable[[DeviceTier], int] | None = None,
) -> dict[str, int]:
    """The budget of every configured tier (C_budget, or what ``budget_of`` says: an
    algorithm's own measure of a device); :class:`ConfigError` for a tier too small to train
    even the minimum (:func:`minimum_budget`)."""
    need = minimum_budget(num_layers, strict)
    budgets = {}
    for i, tier in enumerate(cfg.devices.tiers):
        budget = cost_model.expert_budget(tier, strict) if budget_of is None else budget_of(tier)
        if budget < need:
            raise ConfigError(
                f"devices.tiers[{i}] ('{tier.name}'): cannot train even {need} "
                f"expert{'s' if need > 1 else ''} per batch of this model "
                f"({_shortfall(cost_model, tier, need, need if strict else None)})"
            )
        budgets[tier.name] = budget
    return budgets


def _shortfall(cost_model: CostModel, tier: DeviceTier, experts: int, held: int | None) -> str:
    """What training ``experts`` per batch needs against what ``tier`` has, in words."""
    cost = cost_model.predict(experts, tier.flops, held=held)
    words = f"needs {_gib(cost.peak_bytes)} of {_gib(tier.memory)}"
    if cost.round_seconds is not None and tier.deadline_seconds is not None:
        words += f", {cost.round_seconds:.1f} s of a {tier.deadline_seconds:g} s deadline"
    return words


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
