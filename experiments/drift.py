"""How far each finished run moved the model's routers, experts and attention from where it
started: the relative L2 distance ||W_final - W_0|| / ||W_0|| over each group's tensors.

    .venv/bin/python experiments/drift.py ~/.cache/hfedmoe/models/cluster-e7b4b1b55d288c5f \\
        runs/verdict/qa-domains/{hfedmoe,flexmoe}/seed0

The first argument is the model every run started from (the `cluster` build that
`hfedmoe prepare` prints and caches); each further one a run directory, whose final global
model is RUN/model/model.safetensors. docs/RESULTS.md, setting (e), uses it to ask where
FLEX-MoE's small lead on the last rounds comes from. Reads the safetensors files tensor by
tensor, so it holds one group of the model at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

GROUPS: dict[str, Callable[[str], bool]] = {
    "routers": lambda name: name.endswith("mlp.gate.weight"),
    "experts": lambda name: ".mlp.experts." in name,
    "attention": lambda name: ".self_attn." in name,
}


def relative_drift(start: Path, final: Path, member: Callable[[str], bool]) -> float:
    """||final - start|| / ||start|| over the tensors whose names ``member`` accepts."""
    moved = norm = 0.0
    with safe_open(start, "pt") as s, safe_open(final, "pt") as f:
        for name in filter(member, s.keys()):
            w0 = s.get_tensor(name).double()
            moved += float(torch.sum((f.get_tensor(name).double() - w0) ** 2))
            norm += float(torch.sum(w0**2))
    return (moved / norm) ** 0.5 if norm else float("nan")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: drift.py START_MODEL_DIR RUN_DIR...")
    start = Path(argv[0]) / "model.safetensors"
    print("| run | " + " | ".join(GROUPS) + " |")
    print("|---|" + "---|" * len(GROUPS))
    for run in map(Path, argv[1:]):
        final = run / "model" / "model.safetensors"
        cells = [f"{relative_drift(start, final, member):.2e}" for member in GROUPS.values()]
        print(f"| {run.parent.name}/{run.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
