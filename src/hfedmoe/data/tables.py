"""Any data set as a table: local files read with Hugging Face ``datasets``, and a table's
columns turned into the in-memory :class:`~hfedmoe.data.text.TextDataset` a task trains on.

Every data set goes through :func:`to_text_dataset`: the user's files (``data.dataset =
"local"``, columns named in ``[data.columns]``) and the shipped ones, whose readers build the
same kind of table (``hfedmoe.data.datasets``).

| task              | columns read (``data.columns``)         | ``TextDataset``                  |
| ----------------- | --------------------------------------- | -------------------------------- |
| classification    | text, optional text_pair, label         | texts, pairs, labels             |
| language-modeling | text (a label column only partitions)   | texts                            |
| instruction       | prompt and response, or messages (chat) | conversations                    |
| multiple-choice   | question, choices, answer               | texts (prompts), choices, labels |

Any task may also have a ``group`` column (natural partitions, per-group metrics). Class,
group and (without ``data.label_names``) label names are sorted, so ids never depend on the
order of the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hfedmoe.data.text import TextDataset
from hfedmoe.foundation.config import DataColumns, Task
from hfedmoe.foundation.errors import HFedMoEError

#: file suffix -> the ``datasets`` builder that reads it (compressed files: the suffix before
#: .gz / .bz2 / .xz / .zst, which ``datasets`` decompresses)
BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
#: the splits of a saved DatasetDict that a local data set reads (train; test, else validation)
TRAIN_SPLIT, TEST_SPLITS = "train", ("test", "validation")


def read_table(path: Path, field: str = "data.path", split: str = TRAIN_SPLIT) -> Any:
    """The rows of ``path`` as a ``datasets.Dataset``: a CSV/TSV, JSON (Lines) or Parquet file,
    or a directory written by ``save_to_disk`` (a DatasetDict: its ``split``). Read offline;
    ``datasets`` caches the Arrow form of a file beside its other caches."""
    import datasets  # imported here: it is slow to import and only data loading needs it

    datasets.disable_progress_bars()
    if not path.exists():
        raise HFedMoEError(f"{field}: '{path}' does not exist")
    if path.is_dir():
        table = load_saved(path, field)
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                raise HFedMoEError(
                    f"{field}: the saved data set '{path}' has no '{split}' split "
                    f"(it has {', '.join(table)})"
                )
            table = table[split]
        return _nonempty(table, path, field)
    suffixes = path.suffixes[-2:] if path.suffix in COMPRESSED else path.suffixes[-1:]
    builder = BUILDERS.get(suffixes[0] if suffixes else "")
    if builder is None:
        raise HFedMoEError(
            f"{field}: '{path.name}' is not a CSV, TSV, JSON Lines or Parquet file "
            f"(expected {', '.join(BUILDERS)}, optionally compressed) nor a saved data set"
        )
    options = {"delimiter": "\t"} if suffixes[0] == ".tsv" else {}
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except (ValueError, TypeError, datasets.exceptions.DatasetGenerationError) as exc:
        reason = str(exc.__cause__ or exc).splitlines()[0]
        if "corresponds to no data" in reason:  # a header and nothing else
            raise HFedMoEError(f"{field}: '{path}' has no rows") from None
        raise HFedMoEError(f"{field}: '{path}' cannot be read as {builder} ({reason})") from None
    return _nonempty(table, path, field)


def saved_test_split(path: Path) -> Any | None:
    """The test (else validation) split of a DatasetDict saved at ``path``; None for a file or
    a saved data set of one split."""
    import datasets

    if not path.is_dir():
        return None
    saved = load_saved(path, "data.path")
    if not isinstance(saved, datasets.DatasetDict):
        return None
    name = next((s for s in TEST_SPLITS if s in saved), None)
    return None if name is None else _nonempty(saved[name], path, "data.path")


#: what ``save_to_disk`` writes at the top of its folder: one of these, or it is no saved data set
SAVED_MARKERS = ("state.json", "dataset_dict.json")
#: how every complete Arrow stream ends (``datasets`` saves its tables as Arrow streams): a file
#: cut short lacks it, and pyarrow would read it without a word, as fewer rows
ARROW_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def load_saved(path: Path, field: str) -> Any:
    """The ``Dataset`` or ``DatasetDict`` saved at ``path``; a folder that is none, or one whose
    files are damaged (a missing or cut Arrow file, broken JSON), is one error naming the file."""
    import datasets

    if not any((path / marker).is_file() for marker in SAVED_MARKERS):
        raise HFedMoEError(
            f"{field}: directory '{path}' is not a data set saved with save_to_disk (it has no "
            f"{' or '.join(SAVED_MARKERS)})"
        )
    reason = _damaged_file(path)
    if reason is None:
        try:
            return datasets.load_from_disk(str(path))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            reason = str(exc).splitlines()[0]  # what datasets and pyarrow say of other damage
    raise HFedMoEError(f"{field}: saved data set '{path}' cannot be read: {reason}")


def _damaged_file(path: Path) -> str | None:
    """Which JSON or Arrow file of the saved data set at ``path`` is damaged, and how; None if
    none is (``datasets`` may still find a file missing)."""
    import json

    for file in sorted(path.rglob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable, not UTF-8, or not JSON
            return f"'{file}' is not readable JSON"
    for file in sorted(path.rglob("*.arrow")):
        with file.open("rb") as f:
            f.seek(max(0, file.stat().st_size - len(ARROW_END)))
            if f.read() != ARROW_END:
                return f"'{file}' is cut short (it lacks the end of its Arrow stream)"
    return None


def _nonempty(table: Any, path: Path, field: str) -> Any:
    if len(table) == 0:
        raise HFedMoEError(f"{field}: '{path}' has no rows")
    return table


class Source:
    """Where a table came from, for error messages: ``'data/train.csv' row 7``."""

    def __init__(self, name: str):
        self.name = name

    def error(self, field: str, message: str, row: int | None = None) -> HFedMoEError:
        where = self.name if row is None else f"{self.name} row {row + 1}"
        return HFedMoEError(f"{field}: {where}: {message}")


def to_text_dataset(
    table: Any,
    task: Task,
    columns: DataColumns,
    source: str,
    label_names: Sequence[str] | None = None,
    group_names: Sequence[str] | None = None,
) -> TextDataset:
    """The rows of ``table`` (a ``datasets.Dataset``) as ``task`` reads them through
    ``columns``. ``label_names``: fixed class names (a test file's are the training file's);
    by default the table's own. ``group_names``: the training file's groups, which a test
    file's keep their ids from (groups only it has are appended, sorted)."""
    src = Source(source)
    if getattr(table, "_indices", None) is not None:  # a selection of another table's rows
        table = table.flatten_indices()
    groups, group_names = (
        _ids(_column(table, columns.group, "data.columns.group", src), group_names, src, "group")
        if columns.group is not None
        else (None, ())
    )
    if task == "classification":
        texts = _texts(table, columns.text, "data.columns.text", src)
        pairs = None
        if columns.text_pair is not None:
            pairs = _texts(table, columns.text_pair, "data.columns.text_pair", src)
        labels, names = _labels(table, columns.label, label_names, src)
        return TextDataset(texts, labels, names, groups, group_names, pairs=pairs)
    if task == "language-modeling":  # labels, where the table has them, only partition it
        texts = _texts(table, columns.text, "data.columns.text", src)
        if columns.label not in table.column_names:
            return TextDataset(texts, _zeros(texts), (), groups, group_names)
        labels, names = _labels(table, columns.label, label_names, src)
        return TextDataset(texts, labels, names, groups, group_names)
    if task == "instruction":
        chats = _conversations(table, columns, src)
        texts = ["\n".join(m["content"] for m in chat) for chat in chats]
        return TextDataset(texts, _zeros(texts), (), groups, group_names, conversations=chats)
    if task == "multiple-choice":
        return _multiple_choice(table, columns, src, groups, group_names)
    raise ValueError(f"unknown task {task!r}")


def _column(table: Any, name: str, field: str, src: Source) -> list:
    if name not in table.column_names:
        raise src.error(field, f"no column '{name}' (its columns: {', '.join(table.column_names)})")
    return table.data.column(name).to_pylist()  # Arrow to Python at once, not row by row


def _texts(table: Any, name: str, field: str, src: Source) -> list[str]:
    texts = []
    for n, value in enumerate(_column(table, name, field, src)):
        if not isinstance(value, str) or not value.strip():
            raise src.error(field, f"'{name}' is {value!r}, not a non-empty text", n)
        texts.append(" ".join(value.split()))
    return texts


def _zeros(rows: list) -> np.ndarray:
    return np.zeros(len(rows), dtype=np.int64)


def _labels(
    table: Any, name: str, fixed: Sequence[str] | None, src: Source
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class ids and names: a ClassLabel column's own names, else ``fixed``, else the sorted
    distinct labels; an integer label is an id, a text label a name."""
    values = _column(table, name, "data.columns.label", src)
    feature = table.features[name]
    own = getattr(feature, "names", None)  # a ClassLabel column
    if own is not None and fixed is None:
        fixed = own
    if own is not None:  # ids into the column's names, mapped to ``fixed``
        values = [_class_name(own, v, name, n, src) for n, v in enumerate(values)]
    if fixed is None:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            fixed = [str(i) for i in range(max(values) + 1)]
            values = [str(v) for v in values]
        else:
            fixed = sorted({str(v) for v in values if v is not None})
    names = tuple(str(n) for n in fixed)
    index = {n: i for i, n in enumerate(names)}
    labels = np.empty(len(values), dtype=np.int64)
    for n, v in enumerate(values):
        if isinstance(v, int) and not isinstance(v, bool) and str(v) not in index:
            ok = 0 <= v < len(names)  # an integer id into the declared names
            label = v if ok else None
        else:
            label = index.get(str(v)) if v is not None else None
        if label is None:
            raise src.error("data.label_names", f"label {v!r} is not one of {', '.join(names)}", n)
        labels[n] = label
    if len(names) < 2:
        raise src.error("data.columns.label", f"one class only ({names[0]!r})")
    return labels, names


def _class_name(names: Sequence[str], value: Any, column: str, row: int, src: Source) -> str:
    """The name of a ClassLabel id; -1 (Hugging Face's "no label") or any other id outside the
    names is an error, not the last class Python's negative indexing would give."""
    if not (isinstance(value, int) and 0 <= value < len(names)):
        raise src.error(
            "data.columns.label",
            f"'{column}' is {value!r}, not a class of its ClassLabel (0-{len(names) - 1}; "
            "-1 means unlabelled)",
            row,
        )
    return names[value]


def _ids(
    values: list, known: Sequence[str] | None, src: Source, what: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Ids of ``values`` into ``known`` names followed by the new ones, sorted."""
    if any(v is None for v in values):
        raise src.error(
            f"data.columns.{what}", f"no {what}", next(n for n, v in enumerate(values) if v is None)
        )
    known = tuple(known or ())
    names = known + tuple(sorted({str(v) for v in values} - set(known)))
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[str(v)] for v in values], dtype=np.int64), names


def _conversations(table: Any, columns: DataColumns, src: Source) -> list[list[dict[str, str]]]:
    """Each row's chat: the ``messages`` column as it is, or a user turn (``prompt``) and the
    assistant's answer (``response``). A table with a ``messages`` column and neither of the
    others is a chat table without being told (the common layout of chat data)."""
    names = set(table.column_names)
    messages = columns.messages
    if messages is None and "messages" in names and not {columns.prompt, columns.response} & names:
        messages = "messages"
    if messages is None:
        prompts = _texts(table, columns.prompt, "data.columns.prompt", src)
        responses = _texts(table, columns.response, "data.columns.response", src)
        return [
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in zip(prompts, responses, strict=True)
        ]
    field = "data.columns.messages"
    chats = []
    for n, chat in enumerate(_column(table, messages, field, src)):
        ok = isinstance(chat, list) and len(chat) >= 2
        ok = ok and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in chat
        )
        if not ok:
            raise src.error(field, "not a list of two or more {role, content} messages", n)
        if chat[-1]["role"] != "assistant" or not chat[-1]["content"].strip():
            raise src.error(field, "the last message is not a non-empty assistant answer", n)
        chats.append([{"role": m["role"], "content": m["content"]} for m in chat])
    return chats


def _multiple_choice(
    table: Any,
    columns: DataColumns,
    src: Source,
    groups: np.ndarray | None,
    group_names: tuple[str, ...],
) -> TextDataset:
    """Prompts with their candidate answers; each answer is a continuation of its prompt,
    starting with a space (as qa_mix's)."""
    questions = _column(table, columns.question, "data.columns.question", src)
    all_choices = _column(table, columns.choices, "data.columns.choices", src)
    answers = _column(table, columns.answer, "data.columns.answer", src)
    prompts, choices, labels = [], [], []
    for n, (question, options, answer) in enumerate(
        zip(questions, all_choices, answers, strict=True)
    ):
        if not isinstance(question, str) or not question.strip():
            raise src.error(
                "data.columns.question", f"'{columns.question}' is {question!r}, not a question", n
            )
        texts = [" ".join(str(o).split()) for o in options] if isinstance(options, list) else []
        if len(texts) < 2 or not all(texts) or None in options:  # str(None) would be 'None'
            raise src.error(
                "data.columns.choices", f"{options!r} is not a list of 2+ non-empty answers", n
            )
        said = " ".join(str(answer).split())
        if isinstance(answer, int) and not isinstance(answer, bool):
            right = answer if 0 <= answer < len(texts) else None
        elif said in texts:
            right = texts.index(said)
        else:  # an index read as text (a column mixing both is read as text)
            right = int(said) if said.isdigit() and int(said) < len(texts) else None
        if right is None:
            raise src.error(
                "data.columns.answer",
                f"{answer!r} is neither one of the choices nor their index (0-{len(texts) - 1})",
                n,
            )
        prompts.append(question.strip())
        choices.append(tuple(" " + t for t in texts))
        labels.append(right)
    width = max(len(c) for c in choices)
    return TextDataset(
        texts=prompts,
        labels=np.asarray(labels, dtype=np.int64),
        label_names=tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:width]),
        groups=groups,
        group_names=group_names,
        choices=choices,
    )
