"""Evaluation of a model on a tokenised data set: accuracy and loss per example (classification),
per predicted token (language modelling) or per question (multiple choice, by answer
likelihood)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from hfedmoe.data.tokenized import IGNORE_INDEX, TokenizedDataset, sequential_batches
from hfedmoe.model.routing import lean_forward
from hfedmoe.training.device import on_device, to_device
from hfedmoe.training.objective import predicts_next_tokens, rows_of, scored_tokens, task_loss


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    examples: int
    by_group: dict[str, float] | None = None  # accuracy per group (task), where data has groups
    loss_by_group: dict[str, float] | None = None  # language modelling: loss per group
    perplexity: float | None = None  # language modelling: exp(loss per predicted token)
    # per example (for per-client views, hfedmoe.training.personal): its accuracy (0/1; a
    # language-modelling row: the share of its tokens predicted) and its mean loss
    accuracy_N: np.ndarray | None = field(default=None, repr=False)
    loss_N: np.ndarray | None = field(default=None, repr=False)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TokenizedDataset, batch_size: int, device: str = "cpu"
) -> EvalResult:
    """Accuracy and mean cross-entropy of ``model`` on ``data``, computed on ``device``
    (``train.device``; the model is back on the CPU on return).

    Classification: per example. Language modelling: per predicted token (next-token accuracy
    and loss; a seq2seq model predicts its labels directly, a decoder the next position).
    Multiple choice: :func:`evaluate_choices`.
    """
    with on_device(model, device):
        if data.choices is not None:
            return evaluate_choices(model, data, batch_size)
        return _evaluate_batches(model, data, batch_size)


def loss_gradient(
    model: nn.Module, data: TokenizedDataset, batch_size: int, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """The gradient of the training loss (:func:`task_loss`, a mean over ``data``'s rows) at
    ``model``'s weights, by trainable parameter's name, on the CPU: the server's reference
    direction (``federation.descent_check``). In eval mode, so that no dropout draws: the same
    weights give the same gradient. Holds one gradient as large as the trained weights."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with on_device(model, device) as dev:
        model.eval()
        for p in params.values():
            p.grad = None
        with torch.enable_grad():
            for idx in sequential_batches(len(data), batch_size):
                loss = task_loss(model, to_device(data.batch(idx), dev))
                (loss * (len(idx) / len(data))).backward()
        gradient = {n: p.grad.detach().cpu() for n, p in params.items() if p.grad is not None}
        for p in params.values():
            p.grad = None
    return gradient


def _evaluate_batches(model: nn.Module, data: TokenizedDataset, batch_size: int) -> EvalResult:
    model.eval()
    device = _device_of(model)
    hits_N, loss_N, count_N = (np.zeros(len(data)) for _ in range(3))
    for idx in sequential_batches(len(data), batch_size):
        batch = to_device(data.batch(idx), device)
        labels = batch["labels"]
        if predicts_next_tokens(model, batch):  # logits only where a label is
            scored = scored_tokens(model, batch)
            logits, labels, row = scored.logits_NV, scored.labels_N, scored.row_N
        elif data.language_modeling:  # seq2seq: its decoder's inputs come from the labels
            logits = model(**batch).logits
            keep = labels != IGNORE_INDEX
            row = rows_of(keep)
            logits, labels = logits[keep], labels[keep]
        else:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            row = torch.arange(len(idx), device=labels.device)
        losses = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        hits = (logits.argmax(-1) == labels).double()
        sums_3B = torch.zeros(3, len(idx), dtype=torch.float64, device=labels.device)
        sums_3B.index_add_(1, row, torch.stack([hits, losses.double(), torch.ones_like(hits)]))
        hits_N[idx], loss_N[idx], count_N[idx] = sums_3B.cpu().numpy()
    count = count_N.sum()
    per_row = np.maximum(count_N, 1)
    by_group = loss_by_group = None
    if data.groups is not None and data.language_modeling:  # per token of each group
        tally = {
            name: (hits_N[rows].sum(), loss_N[rows].sum(), count_N[rows].sum())
            for g, name in enumerate(data.group_names)
            if count_N[rows := data.groups == g].sum() > 0
        }
        by_group = {name: float(h / n) for name, (h, _, n) in tally.items()}
        loss_by_group = {name: float(lo / n) for name, (_, lo, n) in tally.items()}
    loss = float(loss_N.sum() / count) if count else math.nan
    return EvalResult(
        float(hits_N.sum() / count),
        loss,
        int(count),
        by_group,
        loss_by_group,
        math.exp(min(loss, 700.0)) if data.language_modeling else None,
        accuracy_N=hits_N / per_row,
        loss_N=loss_N / per_row,
    )


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def continuation_logprobs(
    logits_BKV: torch.Tensor, ids_BT: torch.Tensor, start_B: torch.Tensor, end_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token t | tokens < t) over t in [start, end) of each row, and the count.

    A causal LM's logits at position t - 1 predict token t. ``logits_BKV`` holds the logits of
    the last K positions (K = T: all of them; fewer: ``logits_to_keep``), enough when every
    start >= T - K + 1.
    """
    T, K = ids_BT.shape[1], logits_BKV.shape[1]
    logp_BK = torch.log_softmax(logits_BKV[:, :-1].float(), -1)
    logp_BK = logp_BK.gather(-1, ids_BT[:, T - K + 1 :, None]).squeeze(-1)
    # log p of tokens 1..T-1, zero where no logits were kept: the sum below then adds the same
    # numbers in the same order whatever K is (the positions not kept lie before every start)
    logp_BT = logp_BK.new_zeros(ids_BT.shape[0], T - 1)
    logp_BT[:, T - K :] = logp_BK
    t = torch.arange(1, T, device=ids_BT.device)
    start_B, end_B = start_B.to(ids_BT.device), end_B.to(ids_BT.device)
    keep_BT = (t >= start_B[:, None]) & (t < end_B[:, None])
    return (logp_BT * keep_BT).sum(-1), keep_BT.sum(-1)


@torch.no_grad()
def evaluate_choices(model: nn.Module, data: TokenizedDataset, batch_size: int) -> EvalResult:
    """Multiple choice by answer likelihood: the predicted answer is the one with the highest
    mean log-probability per token after the prompt (normalised by tokens so that no answer
    wins for being short); ``loss`` is the mean cross-entropy per token of the right answers.

    Every (question, answer) pair is one sequence; pairs run in batches of ``batch_size``
    sorted by length, which wastes little on padding.
    """
    assert data.choices is not None and data.answer_start is not None
    model.eval()
    device = _device_of(model)
    pairs = [(i, j) for i, answers in enumerate(data.choices) for j in range(len(answers))]
    prompt = [ids[:start] for ids, start in zip(data.input_ids, data.answer_start, strict=True)]
    rows = [prompt[i] + data.choices[i][j] for i, j in pairs]
    order = sorted(range(len(pairs)), key=lambda k: len(rows[k]))
    sums, counts = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for chunk in sequential_batches(len(order), batch_size):
        ks = [order[c] for c in chunk]
        width = max(len(rows[k]) for k in ks)
        ids_BT = torch.full((len(ks), width), data.pad_id, dtype=torch.long)
        mask_BT = torch.zeros_like(ids_BT)
        for b, k in enumerate(ks):
            ids_BT[b, : len(rows[k])] = torch.tensor(rows[k])
            mask_BT[b, : len(rows[k])] = 1
        ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
        start_B = torch.tensor([len(prompt[pairs[k][0]]) for k in ks])
        # only the answers' logits: from the position before the earliest answer on
        lean = lean_forward(model, logits_to_keep=width - int(start_B.min()) + 1)
        logits = model(input_ids=ids_BT, attention_mask=mask_BT, **lean).logits
        end_B = torch.tensor([len(rows[k]) for k in ks])
        s, n = continuation_logprobs(logits, ids_BT, start_B, end_B)
        sums[ks], counts[ks] = s.cpu(), n.float().cpu()
    right = np.zeros(len(data), dtype=bool)
    loss_N = np.zeros(len(data))
    loss_sum = tokens = 0.0
    k = 0
    for i, answers in enumerate(data.choices):
        mean = sums[k : k + len(answers)] / counts[k : k + len(answers)]
        label = int(data.labels[i])
        right[i] = int(mean.argmax()) == label
        loss_sum -= float(sums[k + label])
        tokens += float(counts[k + label])
        loss_N[i] = -float(sums[k + label]) / max(float(counts[k + label]), 1.0)
        k += len(answers)
    by_group = None
    if data.groups is not None:
        by_group = {
            name: float(right[data.groups == g].mean())
            for g, name in enumerate(data.group_names)
            if (data.groups == g).any()
        }
    return EvalResult(
        float(right.mean()),
        loss_sum / max(tokens, 1.0),
        len(data),
        by_group,
        accuracy_N=right.astype(np.float64),
        loss_N=loss_N,
    )


@torch.no_grad()
def choice_logprobs(
    model: nn.Module, tokenizer, prompt: str, choices: list[str], normalize: bool = False
) -> torch.Tensor:
    """Multiple-choice scoring by answer likelihood: log p(choice | prompt) for each choice, (C,).

    Prompt and choice are tokenised apart and concatenated, so every choice is scored on the
    same prompt tokens; all choices run as one right-padded batch through a causal LM.
    ``normalize`` divides by the choice's token count (favours no answer for being short).
    """
    model.eval()
    prompt_ids = tokenizer(prompt)["input_ids"]
    rows = [prompt_ids + tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_CT = torch.full((len(rows), width), pad, dtype=torch.long)
    mask_CT = torch.zeros_like(ids_CT)
    for c, r in enumerate(rows):
        ids_CT[c, : len(r)] = torch.tensor(r)
        mask_CT[c, : len(r)] = 1
    ids_CT, mask_CT = ids_CT.to(_device_of(model)), mask_CT.to(_device_of(model))
    logits = model(input_ids=ids_CT, attention_mask=mask_CT).logits
    start = torch.full((len(rows),), len(prompt_ids))
    sums, counts = continuation_logprobs(logits, ids_CT, start, mask_CT.sum(-1))
    return (sums / counts if normalize else sums).cpu()
