"""A data set in memory: texts with labels, optionally natural groups and answer choices."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels into ``label_names``.

    ``groups``: each row's natural id into ``group_names`` (the movie a review is of, the task a
    question comes from), for natural partitions; None where a data set has none.
    ``choices``: multiple choice: each row's candidate answers; ``labels`` index the right one
    and ``texts`` are the prompts.
    """

    texts: list[str]
    labels: np.ndarray  # (N,) int64
    label_names: tuple[str, ...]
    groups: np.ndarray | None = None  # (N,) int64
    group_names: tuple[str, ...] = ()
    choices: list[tuple[str, ...]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray | list[int]) -> TextDataset:
        idx = np.asarray(idx, dtype=np.int64)
        return TextDataset(
            [self.texts[i] for i in idx],
            self.labels[idx],
            self.label_names,
            None if self.groups is None else self.groups[idx],
            self.group_names,
            None if self.choices is None else [self.choices[i] for i in idx],
        )


@dataclass(frozen=True)
class Split:
    train: TextDataset
    test: TextDataset
