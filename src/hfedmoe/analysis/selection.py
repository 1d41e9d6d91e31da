"""Does a method's expert selection hit the experts that matter to each client? (Why the
methods differ, measured after a run.)

For every client of a finished run whose last training updated some but not all experts of a
layer: its loss on its own data (the first ``cap`` examples of its partition, eval mode) with
the experts it updated in that round removed from routing, against removing as many experts
drawn at random in each layer (the mean over ``draws`` draws). The ratio of the two loss rises
(per client, :func:`hfedmoe.analysis.measures.removal_ratio`; summed over clients,
:func:`pooled_ratio`) is above 1 when the method trained experts the client's data depends on
more than a random choice of the same size would have.

The model is the run's final global model, not the one each selection was made on (the round
before it): the experts' roles move little in a round, but the measure is an estimate. A layer
whose every expert the client updated is left whole in both removals (removing all of them is
not defined); a client that updated every expert (a workstation) has no row.

Shape legend: L MoE layers, E experts per layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from hfedmoe.analysis.measures import removal_ratio
from hfedmoe.analysis.routing import losses_without
from hfedmoe.data.text import TextDataset
from hfedmoe.data.tokenized import tokenize_for
from hfedmoe.federation.workload import partitions
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.files import write_atomic

#: where ``hfedmoe analyze RUN`` writes the measure, in RUN/analysis/; the report reads it
FILENAME = "selection.json"


def last_updates(rounds: list[dict], shape: tuple[int, int]) -> dict[int, torch.Tensor]:
    """Each client's (by partition id) experts updated in the last round it trained, (L, E)
    bool, from a run's metrics.jsonl records (round 0 first)."""
    last: dict[int, torch.Tensor] = {}
    for record in rounds:
        for client in record.get("clients", []):
            counts, pid = client.get("expert_updates"), client.get("partition_id")
            if counts and pid is not None:
                last[int(pid)] = torch.as_tensor(counts).reshape(shape) > 0
    return last


def removable(updated_LE: torch.Tensor) -> torch.Tensor:
    """The experts to remove: those updated, in layers where at least one expert was not."""
    return updated_LE & ~updated_LE.all(dim=1, keepdim=True)


def random_like(removed_LE: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """As many experts per layer as ``removed_LE`` marks, drawn uniformly in that layer."""
    out = torch.zeros_like(removed_LE)
    L, E = removed_LE.shape
    for layer in range(L):
        m = int(removed_LE[layer].sum())
        out[layer, torch.as_tensor(rng.choice(E, m, replace=False), dtype=torch.long)] = True
    return out


def selection_cost(
    cfg: ExperimentConfig,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train: TextDataset,
    rounds: list[dict],
    shape: tuple[int, int],
    rng: np.random.Generator,
    cap: int = 64,
    draws: int = 3,
    batch_size: int = 32,
) -> list[dict]:
    """Per client that a removal applies to: its loss, without the experts it updated, without
    as many random ones, and the ratio of the rises (see the module docstring). ``train``: the
    experiment's training split, which its partition divides."""
    updated = last_updates(rounds, shape)
    if not updated:
        return []
    rows_by_client = partitions(cfg, train, cfg.federation.num_clients)
    out = []
    for pid in sorted(updated):
        removed_LE = removable(updated[pid])
        rows = rows_by_client[pid][:cap]
        if not removed_LE.any() or len(rows) == 0:
            continue
        data = tokenize_for(cfg, train.subset(rows), tokenizer)
        removals = [removed_LE] + [random_like(removed_LE, rng) for _ in range(draws)]
        full, selected, *random_D = losses_without(model, data, removals, batch_size)
        random = float(np.mean(random_D))
        out.append(
            {
                "partition": pid,
                "examples": len(rows),
                "experts_removed": int(removed_LE.sum()),
                "loss": full,
                "loss_without_selected": selected,
                "loss_without_random": random,
                "ratio": removal_ratio(full, selected, random),
            }
        )
    return out


def rises(rows: list[dict]) -> tuple[float, float]:
    """The loss rises summed over clients: without their selections, without random ones."""
    selected = sum(r["loss_without_selected"] - r["loss"] for r in rows)
    return float(selected), float(sum(r["loss_without_random"] - r["loss"] for r in rows))


def pooled_ratio(rows: list[dict]) -> float:
    """Sum over clients of the loss rise without each client's selection, over the same sum
    without random experts: 1 for a selection no better than chance. Per-client ratios are
    fragile (a random removal may barely move one client's loss); the pooled one is not. NaN
    when random removals do not raise the loss in all."""
    selected, random = rises(rows)
    return selected / random if random > 0 else float("nan")


def write_selection(rows: list[dict], out_dir: Path) -> Path:
    """``out_dir``/selection.json: every client's row, the summed rises and the pooled ratio,
    replaced whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILENAME
    selected, random = rises(rows)
    body = {
        "pooled_ratio": pooled_ratio(rows),
        "rise_selected": selected,
        "rise_random": random,
        "selection": rows,
    }
    write_atomic(path, json.dumps(body, indent=1) + "\n")
    return path
