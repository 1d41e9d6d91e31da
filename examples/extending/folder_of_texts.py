"""A data set in a layout hfedmoe does not read (one folder per class, one text file per
example) made a table that it does: a Parquet file for ``data.dataset = "local"``.

    python -m examples.extending.folder_of_texts ROOT OUT.parquet
"""

from __future__ import annotations

import sys
from pathlib import Path

from datasets import Dataset


def folder_table(root: Path) -> Dataset:
    """``root/<class>/<name>.txt`` -> rows of text, label (the folder) and source (the file's
    stem before its first '-', a natural group)."""
    rows = {"text": [], "label": [], "source": []}
    for file in sorted(root.glob("*/*.txt")):
        rows["text"].append(file.read_text(encoding="utf-8").strip())
        rows["label"].append(file.parent.name)
        rows["source"].append(file.stem.split("-")[0])
    return Dataset.from_dict(rows)


if __name__ == "__main__":
    folder_table(Path(sys.argv[1])).to_parquet(sys.argv[2])
