"""A data set in memory: texts with labels, optionally natural groups, answer choices, second
texts (pairs) or conversations."""

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
    ``pairs``: classification of text pairs: each row's second text.
    ``conversations``: instruction tuning: each row's messages ({role, content}), the last the
    assistant's answer; ``texts`` are their contents joined (for inspection), ``labels`` zeros.
    """

    texts: list[str]
    labels: np.ndarray  # (N,) int64
    label_names: tuple[str, ...]
    groups: np.ndarray | None = None  # (N,) int64
    group_names: tuple[str, ...] = ()
    choices: list[tuple[str, ...]] | None = field(default=None, repr=False)
    pairs: list[str] | None = field(default=None, repr=False)
    conversations: list[list[dict[str, str]]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray | list[int]) -> TextDataset:
        idx = np.asarray(idx, dtype=np.int64)

        def pick(rows: list | None) -> list | None:
            return None if rows is None else [rows[i] for i in idx]

        return TextDataset(
            pick(self.texts),
            self.labels[idx],
            self.label_names,
            None if self.groups is None else self.groups[idx],
            self.group_names,
            pick(self.choices),
            pick(self.pairs),
            pick(self.conversations),
        )


@dataclass(frozen=True)
class Split:
    """A run's data: what the clients' partitions are cut from, the test split and, with
    ``data.validation_fraction``, the validation split (rows held out of training; else None)."""

    train: TextDataset
    test: TextDataset
    validation: TextDataset | None = None
