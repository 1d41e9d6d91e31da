"""Tokenised examples and the mini-batches drawn from them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hfedmoe.data.datasets import TextDataset

IGNORE_INDEX = -100  # label of positions that no loss is computed on (transformers' convention)


@dataclass(frozen=True)
class TokenizedDataset:
    """Unpadded token ids (truncated to ``max_length``) with labels.

    ``language_modeling``: the batch's labels are the token ids themselves, padding ignored
    (-100); the model shifts them for next-token prediction.
    """

    input_ids: list[list[int]]
    labels: np.ndarray  # (N,) class labels
    pad_id: int
    language_modeling: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Pad the rows ``idx`` to their longest: input_ids, attention_mask (B, T), labels (B,)."""
        rows = [self.input_ids[i] for i in idx]
        width = max(len(r) for r in rows)
        ids_BT = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids_BT[b, : len(r)] = torch.tensor(r)
            mask_BT[b, : len(r)] = 1
        if self.language_modeling:
            labels = ids_BT.masked_fill(mask_BT == 0, IGNORE_INDEX)
        else:
            labels = torch.as_tensor(self.labels[idx], dtype=torch.long)
        return {"input_ids": ids_BT, "attention_mask": mask_BT, "labels": labels}


def tokenize(
    data: TextDataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    language_modeling: bool = False,
) -> TokenizedDataset:
    enc = tokenizer(data.texts, truncation=True, max_length=max_length, padding=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenizedDataset(list(enc["input_ids"]), data.labels, int(pad or 0), language_modeling)


def sequential_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Index batches 0..n-1 in order (evaluation)."""
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))


def shuffled_batches(
    n: int, batch_size: int, steps: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """``steps`` index batches, cycling through fresh permutations (training)."""
    order = rng.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n and pos > 0:
            order, pos = rng.permutation(n), 0
        batch = order[pos : pos + batch_size]
        pos += batch_size
        yield batch
