"""The one local training loop, shared by every algorithm.

Every step sees the model through the expert interface: the routing of the batch is captured,
the algorithm chooses which experts to update (:class:`StepHooks`; by default every expert the
batch was routed to), the backward pass skips the others (backward-only mode, METHOD.md §3) and
the optimizer leaves them untouched (§7). An algorithm customises this through hooks; it never
copies the loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hfedmoe.data.tokenized import TokenizedDataset, shuffled_batches
from hfedmoe.foundation.config import TrainConfig
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.routing import RoutingCapture
from hfedmoe.training.device import on_device, to_device
from hfedmoe.training.memory import PeakMemory
from hfedmoe.training.objective import task_loss
from hfedmoe.training.optimizer import ExpertAdamW


class StepHooks:
    """Per-step customisation points of :func:`train_local`."""

    def select_experts(
        self, capture: RoutingCapture, batch: dict[str, torch.Tensor], routed_LE: torch.Tensor
    ) -> torch.Tensor:
        """The (L, E) experts to update on this batch; default: all routed experts (E_union)."""
        return routed_LE

    def auxiliary_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A loss added to the task loss before the backward pass (after the forward pass of
        ``batch``); default: none. The mean loss reported is the task loss's."""
        return None

    def after_backward(self, active_LE: torch.Tensor) -> None:
        """Called after the backward pass, before clipping and the optimizer step, while the
        gradients of the ``active_LE`` experts are there; default: nothing."""


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    steps: int
    examples_seen: int
    seconds: float
    expert_updates: torch.Tensor  # (L, E) int: batches in which each expert was updated
    routed_per_step: float  # mean |E_union| per batch
    routed: torch.Tensor  # (L, E) bool: experts routed to in at least one batch
    max_active_per_step: int  # the most experts updated on any one batch (<= C_budget)
    peak_memory_increase: int | None = None  # measured peak RSS above the start (Linux)


def train_local(
    model: nn.Module,
    data: TokenizedDataset,
    cfg: TrainConfig,
    rng: np.random.Generator,
    hooks: StepHooks | None = None,
) -> TrainResult:
    """``cfg.local_steps`` AdamW steps on mini-batches of ``data``.

    The optimizer is created fresh (a client keeps no optimizer state between rounds). Experts
    outside the hooks' selection get no weight gradient and are not moved by the optimizer: no
    moment update, no weight decay.

    The model trains on ``cfg.device`` and is back on the CPU on return; the hooks see the
    routing and the batch on the CPU (they are small), so no algorithm deals with devices.
    """
    with (
        on_device(model, cfg.device) as device,
        activation_checkpointing(model, cfg.activation_checkpointing),
    ):
        return _train_steps(model, data, cfg, rng, hooks or StepHooks(), device)


#: autocast's dtype for each ``train.precision`` that is not fp32
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's precision (``train.precision``): bf16 or fp16 autocast, or as it is
    (the training loop's and the cost model's probe of its activations)."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """The block's forward passes keep only each transformer layer's input and recompute the
    layer in the backward pass (``train.activation_checkpointing``; transformers' own, with
    torch's non-reentrant checkpoint, which replays dropout's random numbers and autocast as the
    forward pass had them). A routing capture must end before the backward pass, as the loop's
    does, or it would record the recomputed routing twice."""
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(
            f"train.activation_checkpointing: model type '{kind}' does not support it "
            "(expected a transformers model that supports gradient checkpointing)"
        )
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.activation_checkpointing_disable()


def _finite_gradients(params: list[nn.Parameter]) -> bool:
    """Whether every gradient is finite (one norm over all of them)."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(nn.utils.get_total_norm(grads)))


def _train_steps(
    model: nn.Module,
    data: TokenizedDataset,
    cfg: TrainConfig,
    rng: np.random.Generator,
    hooks: StepHooks,
    device: torch.device,
) -> TrainResult:
    em = ExpertModel(model)
    optimizer = ExpertAdamW(
        model.parameters(),
        em.expert_axes(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        forget_inactive=cfg.inactive_expert_state == "drop",
    )
    params = [p for p in model.parameters() if p.requires_grad]
    # fp16's narrow range: the loss is scaled up before the backward pass and the gradients
    # unscaled after it; a step whose gradients overflow is skipped and the scale halved (torch's
    # dynamic loss scaling). Disabled, every call below is the identity.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    model.train()
    start, losses, seen = time.perf_counter(), [], 0
    updates_LE = torch.zeros(em.shape, dtype=torch.long)
    routed_total = max_active = 0
    routed_any_LE = torch.zeros(em.shape, dtype=torch.bool)
    batch_size = min(cfg.batch_size, len(data))
    # the loop's peak memory above its start: what the budget cost model predicts
    with PeakMemory(device) as memory:
        for idx in shuffled_batches(len(data), batch_size, cfg.local_steps, rng):
            batch = data.batch(idx)
            optimizer.zero_grad()
            with em.capture() as capture, autocast_for(cfg.precision, device):
                loss = task_loss(model, to_device(batch, device))
            routed_LE = capture.routed(batch.get("attention_mask"))
            active_LE = hooks.select_experts(capture, batch, routed_LE) & routed_LE
            auxiliary = hooks.auxiliary_loss(batch)
            with em.update_only(active_LE):
                scaler.scale(loss if auxiliary is None else loss + auxiliary).backward()
            scaler.unscale_(optimizer)
            stepped = not scaler.is_enabled() or _finite_gradients(params)
            if stepped:  # a skipped step's hooks would read infinite gradients
                hooks.after_backward(active_LE)
            rows = em.expert_grad_mask(active_LE)
            if cfg.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(
                    [p for p in params if p.grad is not None], cfg.max_grad_norm
                )
            scaler.step(optimizer, rows)  # optimizer.step(rows), unless the gradients overflowed
            scaler.update()
            losses.append(loss.item())
            seen += len(idx)
            updates_LE += active_LE.long() * stepped
            routed_total += int(routed_LE.sum())
            routed_any_LE |= routed_LE
            max_active = max(max_active, int(active_LE.sum()))
        optimizer.zero_grad()  # the peak is measured; gradients are not needed after it
    model.eval()
    return TrainResult(
        mean_loss=float(np.mean(losses)),
        steps=len(losses),
        examples_seen=seen,
        seconds=time.perf_counter() - start,
        expert_updates=updates_LE,
        routed_per_step=routed_total / len(losses),
        routed=routed_any_LE,
        peak_memory_increase=memory.increase,
        max_active_per_step=max_active,
    )
