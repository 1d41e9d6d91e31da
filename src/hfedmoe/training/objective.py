"""The loss a batch is trained on, and the logits a decoder's language modelling scores.

A causal LM's logits at every position are the largest tensor of its pass (SmolLM2: 49,152
words a position), and language modelling on chats scores only the answers' positions. Both the
training loss and evaluation therefore compute a decoder's logits at the labelled positions only
(:func:`hfedmoe.model.routing.logits_at`); every other model computes its own loss as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hfedmoe.data.tokenized import IGNORE_INDEX
from hfedmoe.model.routing import lean_forward, logits_at


@dataclass(frozen=True)
class ScoredTokens:
    """A decoder's pass over a batch, reduced to the N positions whose next token has a label."""

    logits_NV: torch.Tensor
    labels_N: torch.Tensor
    row_N: torch.Tensor  # the batch row of each position
    aux_loss: torch.Tensor | None  # a native MoE's load-balancing loss, where it computes one


def predicts_next_tokens(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Language modelling by a decoder: (B, T) labels that the model shifts itself."""
    labels = batch.get("labels")
    return (
        labels is not None
        and labels.dim() == 2
        and not getattr(model.config, "is_encoder_decoder", False)
    )


def scored_tokens(model: nn.Module, batch: dict[str, torch.Tensor]) -> ScoredTokens:
    """Logits at the positions whose next token has a label (position t predicts token t + 1).

    The model is not given the labels: its own loss would ask for every position's logits.
    """
    labels_BT = batch["labels"][:, 1:]
    keep_BT = labels_BT != IGNORE_INDEX
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    at_inputs_BT = nn.functional.pad(keep_BT, (0, 1))  # the last position predicts nothing
    with logits_at(model, at_inputs_BT) as selected:
        out = model(**inputs, **lean_forward(model, logits_to_keep=0))
    logits_NV = out.logits if selected else out.logits[at_inputs_BT]
    return ScoredTokens(logits_NV, labels_BT[keep_BT], rows_of(keep_BT), out.get("aux_loss"))


def rows_of(keep_BT: torch.Tensor) -> torch.Tensor:
    """The batch row of each position ``keep_BT`` marks, in row-major order: (N,)."""
    return keep_BT.nonzero()[:, 0]


def task_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's training loss: the mean cross-entropy over its labelled tokens (a decoder's
    language modelling, plus a native MoE's load-balancing term as its own forward adds it) or
    the model's own loss (classification, seq2seq)."""
    if not predicts_next_tokens(model, batch):
        return model(**batch).loss
    scored = scored_tokens(model, batch)
    loss = nn.functional.cross_entropy(scored.logits_NV.float(), scored.labels_N)
    if scored.aux_loss is not None:  # what transformers' MoE families add when given labels
        loss = loss + model.config.router_aux_loss_coef * scored.aux_loss.to(loss.device)
    return loss
