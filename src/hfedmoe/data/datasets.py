"""Text classification data sets, read from shipped files into memory.

Each loader returns a :class:`TextDataset` with class names sorted alphabetically, so label ids
never depend on the order in which a file system lists directories.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hfedmoe.assets import shipped_path
from hfedmoe.config import DataConfig
from hfedmoe.errors import HFedMoEError


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels into ``label_names``."""

    texts: list[str]
    labels: np.ndarray  # (N,) int64
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray | list[int]) -> TextDataset:
        idx = np.asarray(idx, dtype=np.int64)
        return TextDataset([self.texts[i] for i in idx], self.labels[idx], self.label_names)


@dataclass(frozen=True)
class Split:
    train: TextDataset
    test: TextDataset


def read_bbc_news(root: Path) -> TextDataset:
    """BBC News: ``root/<class>/<NNN>.txt``; first line is the title."""
    if not root.is_dir():
        raise HFedMoEError(f"data.path: directory '{root}' does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise HFedMoEError(f"data.path: '{root}' must hold one folder per class (found {classes})")
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for file in sorted((root / name).glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                texts.append(" ".join(text.split()))  # titles and paragraphs on one line
                labels.append(label)
    if not texts:
        raise HFedMoEError(f"data.path: no .txt files under '{root}'")
    return TextDataset(texts, np.asarray(labels, dtype=np.int64), tuple(classes))


def load_dataset(cfg: DataConfig, seed: int) -> Split:
    """Load ``cfg.dataset`` and split it into train/test, stratified by label, with ``seed``."""
    root = Path(cfg.path) if cfg.path else shipped_path(cfg.dataset)
    full = read_bbc_news(root)
    train_idx, test_idx = stratified_split(full.labels, cfg.test_fraction, seed)
    rng = np.random.default_rng(seed)
    if cfg.max_train_examples is not None and cfg.max_train_examples < len(train_idx):
        train_idx = np.sort(rng.choice(train_idx, cfg.max_train_examples, replace=False))
    if cfg.max_test_examples is not None and cfg.max_test_examples < len(test_idx):
        test_idx = np.sort(rng.choice(test_idx, cfg.max_test_examples, replace=False))
    return Split(full.subset(train_idx), full.subset(test_idx))


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train/test split that keeps each class's share (rounded per class).

    Written by hand (eight lines) rather than through ``datasets.train_test_split``, which needs
    a ClassLabel column and returns shuffled rows instead of the indices we keep.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
