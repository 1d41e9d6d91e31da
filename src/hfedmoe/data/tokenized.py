"""Tokenised examples and the mini-batches drawn from them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hfedmoe.data.datasets import TextDataset


@dataclass(frozen=True)
class TokenizedDataset:
    """Unpadded token ids (truncated to ``max_length``) with labels."""

    input_ids: list[list[int]]
    labels: np.ndarray  # (N,)
    pad_id: int

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
        return {
            "input_ids": ids_BT,
            "attention_mask": mask_BT,
            "labels": torch.as_tensor(self.labels[idx], dtype=torch.long),
        }


def tokenize(
    data: TextDataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedDataset:
    enc = tokenizer(data.texts, truncation=True, max_length=max_length, padding=False)
    return TokenizedDataset(list(enc["input_ids"]), data.labels, int(tokenizer.pad_token_id or 0))


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
