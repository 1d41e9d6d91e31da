"""A chat fine-tuning file from the shipped BoolQ, for configs/chat_sft.toml (the chat job of
docs/BENCHMARKS.md's memory figures): each labelled question becomes a chat of a system
message, the passage and question as the user's turn, and "Yes." or "No." as the assistant's.

    .venv/bin/python experiments/chat_data.py            # 600 chats -> runs/data/boolq_chat.jsonl
    .venv/bin/python experiments/chat_data.py --rows 2000 --out runs/data/big.jsonl

The same rows for the same --rows and --seed (a seeded sample of BoolQ's labelled rows);
generated data is not committed (runs/ is ignored).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from hfedmoe.foundation.assets import shipped_path

SYSTEM = "Answer the question about the passage with yes or no."


def chats(rows: int, seed: int = 0) -> list[dict]:
    """``rows`` BoolQ questions with a label, sampled with ``seed``, as chats."""
    path = shipped_path("qa_mix") / "BoolQ" / "combined.jsonl"
    with path.open(encoding="utf-8") as f:
        labelled = [r for line in f if isinstance((r := json.loads(line)).get("label"), bool)]
    if rows > len(labelled):
        raise SystemExit(f"--rows: BoolQ has {len(labelled)} labelled questions, asked {rows}")
    picked = random.Random(seed).sample(labelled, rows)
    return [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{r['passage']}\n\n{r['question']}?"},
                {"role": "assistant", "content": "Yes." if r["label"] else "No."},
            ]
        }
        for r in picked
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/data/boolq_chat.jsonl"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = chats(args.rows, args.seed)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(args.out)  # whole or not at all
    print(f"{len(rows)} chats -> {args.out}")


if __name__ == "__main__":
    main()
