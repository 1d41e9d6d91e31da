"""How far each finished run moved the model's routers, experts and shared parameters from
where it started: the relative L2 distance ||W_final - W_0|| / ||W_0|| over each group.

    .venv/bin/python experiments/drift.py ~/.cache/hfedmoe/models/cluster-e7b4b1b55d288c5f \\
        runs/verdict/qa-domains/{hfedmoe,flexmoe}/seed0

The first argument is the model every run started from (a directory hfedmoe saved: the
`cluster` build that `hfedmoe prepare` prints and caches); each further one a run directory,
whose final global model is RUN/model/model.safetensors and must have the start's architecture
(not FFT-MoE's dense parent with adapters). docs/RESULTS.md, setting (e), uses it to ask where
FLEX-MoE's small lead on the last rounds comes from.

Which tensors are routers and which are experts comes from the project's own layout
(``ExpertModel``, as the server's aggregation sees them), read off the start model's
architecture built on the meta device, so no weights are loaded for it; the weights are then
read from the safetensors files one tensor at a time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from hfedmoe.foundation.config import ModelConfig
from hfedmoe.model.checkpoint import META_FILE, WEIGHTS_FILE
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.factory import build_model

GROUPS = ("routers", "experts", "shared")


def groups_of(directory: Path) -> dict[str, str]:
    """Each state-dict name of the saved model in ``directory``: its group."""
    meta = json.loads((directory / META_FILE).read_text())
    with torch.device("meta"):
        model = build_model(
            ModelConfig.model_validate(meta["model"]),
            meta["task"],
            seed=0,
            pretrained=False,
            model_dir=directory,
        )
    layout = ExpertModel(model)
    group = dict.fromkeys(model.state_dict(), "shared")
    group.update({n: "routers" for names in layout.router_entries().values() for n in names})
    group.update(
        {x.state_name: "experts" for entries in layout.expert_entries().values() for x in entries}
    )
    return group


def relative_drift(start: Path, final: Path, group: dict[str, str]) -> dict[str, float]:
    """Per group, ||final - start|| / ||start|| over the tensors of ``start`` in that group."""
    moved = dict.fromkeys(GROUPS, 0.0)
    norm = dict.fromkeys(GROUPS, 0.0)
    with safe_open(start, "pt") as s, safe_open(final, "pt") as f:
        names = s.keys()  # a safetensors handle is not iterable
        missing = set(names) - set(f.keys())
        if missing:
            raise SystemExit(
                f"drift.py: {final} lacks {len(missing)} of the start model's tensors "
                f"(e.g. {min(missing)}); expected a run of the same architecture"
            )
        for name in names:
            w0 = s.get_tensor(name).double()
            moved[group[name]] += float(torch.sum((f.get_tensor(name).double() - w0) ** 2))
            norm[group[name]] += float(torch.sum(w0**2))
    return {g: (moved[g] / norm[g]) ** 0.5 if norm[g] else float("nan") for g in GROUPS}


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: drift.py START_MODEL_DIR RUN_DIR...")
    start = Path(argv[0])
    group = groups_of(start)
    print("| run | " + " | ".join(GROUPS) + " |")
    print("|---|" + "---|" * len(GROUPS))
    for run in map(Path, argv[1:]):
        drift = relative_drift(start / WEIGHTS_FILE, run / "model" / WEIGHTS_FILE, group)
        cells = " | ".join(f"{drift[g]:.2e}" for g in GROUPS)
        print(f"| {run.parent.name}/{run.name} | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1:])
