"""``hfedmoe analyze``: how specialised a model's experts are, on an experiment's data.

On the test split (at most ``max_examples`` rows), by group (a data set's domains or tasks,
else its labels):

- per MoE layer: normalised routing entropy, load coefficient of variation, and the normalised
  mutual information between expert choice and group;
- each group's share of tokens on each expert against the uniform k/E (a heatmap per layer);
- on the experiment's federated partition: each client's usage u_c (eq. (16): the mean router
  probabilities over its data, eval mode) and the mean pairwise Jensen-Shannon divergence;
- per group: the loss with its most-used expert of every layer removed, against removing a
  random other expert (the mean over ``draws`` draws): experts that are interchangeable give a
  ratio near 1;
- for a finished run (its metrics.jsonl records): per client, the loss cost of removing the
  experts it last updated against as many random ones (:mod:`hfedmoe.analysis.selection`).

The report is ``specialisation.json`` (every number), ``specialisation.md`` (tables) and
``shares.png`` (the heatmaps).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from hfedmoe.analysis.measures import (
    group_shares,
    load_cv,
    mean_pairwise_jsd,
    normalised_mutual_information,
    removal_ratio,
)
from hfedmoe.analysis.routing import collect_routing, losses_without, removal_mask
from hfedmoe.analysis.selection import pooled_ratio, selection_cost, write_selection
from hfedmoe.data.datasets import load_dataset
from hfedmoe.data.tokenized import tokenize_for
from hfedmoe.federation.workload import partitions
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.foundation.files import write_atomic
from hfedmoe.foundation.seeding import ANALYSIS, rng_for

#: a data set with more groups than this (Rotten Tomatoes' 508 movies) is analysed by label
MAX_GROUPS = 32


def analyze(
    cfg: ExperimentConfig,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    by: str = "auto",
    max_examples: int = 400,
    removal_examples: int = 64,
    draws: int = 3,
    batch_size: int = 32,
    rounds: list[dict] | None = None,
) -> dict:
    """The specialisation report of ``model`` on ``cfg``'s data (see the module docstring);
    ``rounds``: a finished run's metrics.jsonl records, for the selection measure."""
    split = load_dataset(cfg.data, cfg.seed)
    rng = rng_for(cfg.seed, ANALYSIS)
    test = split.test
    if len(test) > max_examples:
        test = test.subset(np.sort(rng.choice(len(test), max_examples, replace=False)))
    by, groups_S, names = _groups(test, by)
    data = tokenize_for(cfg, test, tokenizer)
    stats = collect_routing(model, data, groups_S, len(names), batch_size)
    L, E = stats.load_LE.shape
    shares_LGE = torch.stack([group_shares(j, stats.tokens_G) for j in stats.joint_LGE])
    layers = [
        {
            "layer": layer,
            "top_k": stats.top_k[layer],
            "entropy": float(stats.entropy_L[layer]),
            "load_cv": load_cv(stats.load_LE[layer]),
            "nmi": normalised_mutual_information(stats.joint_LGE[layer]),
        }
        for layer in range(L)
    ]
    report = {
        "experts": E,
        "by": by,
        "groups": list(names),
        "examples": len(data),
        "tokens": stats.tokens,
        "layers": layers,
        "shares": shares_LGE.tolist(),
        "clients": _clients(cfg, model, tokenizer, split.train, batch_size, max_examples),
        "removal": _removal(
            model, data, groups_S, names, shares_LGE, removal_examples, draws, batch_size, rng
        ),
    }
    if rounds is not None:
        report["selection"] = selection_cost(
            cfg, model, tokenizer, split.train, rounds, (L, E), rng, removal_examples, draws,
            batch_size,
        )  # fmt: skip
    return report


def _groups(test, by: str) -> tuple[str, np.ndarray, tuple[str, ...]]:
    """What to group tokens by ("group" or "label", resolving "auto"), each sample's group id
    and the group names."""
    has_groups = test.groups is not None and len(test.group_names) <= MAX_GROUPS
    if by == "group" and test.groups is None:
        raise HFedMoEError("--by group: this data set has no groups (domains, tasks)")
    if by == "group" or (by == "auto" and has_groups):
        return "group", test.groups, test.group_names
    return "label", test.labels, test.label_names


def _clients(cfg: ExperimentConfig, model: nn.Module, tokenizer, train, batch_size: int, cap: int):
    """u_c of every client of the federated partition (its first ``cap`` samples)."""
    usage = []
    for rows in partitions(cfg, train, cfg.federation.num_clients):
        data = tokenize_for(cfg, train.subset(rows[:cap]), tokenizer)
        stats = collect_routing(model, data, np.zeros(len(data), dtype=np.int64), 1, batch_size)
        usage.append(stats.usage())
    u_CLE = torch.stack(usage)
    return {"usage": u_CLE.tolist(), "mean_pairwise_jsd": mean_pairwise_jsd(u_CLE)}


def _removal(model, data, groups_S, names, shares_LGE, cap, draws, batch_size, rng) -> list:
    """Per group: the loss, and with its most-used (or a random other) expert removed."""
    L, _, E = shares_LGE.shape
    out = []
    for g, name in enumerate(names):
        rows = np.flatnonzero(groups_S == g)[:cap]
        if len(rows) == 0:
            continue
        part = data.subset(rows)
        top_L = [int(shares_LGE[layer, g].argmax()) for layer in range(L)]
        others = [
            [int(rng.choice([e for e in range(E) if e != t])) for t in top_L] for _ in range(draws)
        ]
        removals = [removal_mask((L, E), r) for r in (top_L, *others)]
        full, top, *random = losses_without(model, part, removals, batch_size)
        rand = float(np.mean(random))
        out.append(
            {
                "group": name,
                "examples": len(rows),
                "loss": full,
                "loss_without_top": top,
                "loss_without_random": rand,
                "ratio": removal_ratio(full, top, rand),
            }
        )
    return out


def summary(report: dict) -> dict:
    """The headline numbers (the targets of docs/SPECIALISATION.md)."""
    ratios = [r["ratio"] for r in report["removal"] if np.isfinite(r["ratio"])]
    head = {
        "max_entropy": max(x["entropy"] for x in report["layers"]),
        "mean_nmi": float(np.mean([x["nmi"] for x in report["layers"]])),
        "mean_load_cv": float(np.mean([x["load_cv"] for x in report["layers"]])),
        "clients_jsd": report["clients"]["mean_pairwise_jsd"],
        "median_removal_ratio": float(np.median(ratios)) if ratios else float("nan"),
    }
    if "selection" in report:
        head["pooled_selection_ratio"] = pooled_ratio(report["selection"])
    return head


def write_report(report: dict, out_dir: Path, title: str) -> list[Path]:
    """specialisation.json, specialisation.md and shares.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    head = summary(report)
    paths = [out_dir / "specialisation.json", out_dir / "specialisation.md", out_dir / "shares.png"]
    # each file is replaced whole (a rerun never leaves a half-written report)
    write_atomic(paths[0], json.dumps({"summary": head, **report}, indent=1) + "\n")
    write_atomic(paths[1], _markdown(report, head, title))
    tmp = out_dir / ".shares.png"
    _heatmaps(report, tmp, title)
    os.replace(tmp, paths[2])
    if "selection" in report:  # also alone, where `analyze RUN --selection-only` writes it
        paths.append(write_selection(report["selection"], out_dir))
    return paths


def _markdown(report: dict, head: dict, title: str) -> str:
    lines = [
        f"# Specialisation: {title}",
        "",
        f"{report['examples']} test examples ({report['tokens']} tokens) by "
        f"{report['by']}; {report['experts']} experts per layer.",
        "",
        "| layer | top-k | routing entropy (norm.) | load CV | NMI(expert; group) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for x in report["layers"]:
        lines.append(
            f"| {x['layer']} | {x['top_k']} | {x['entropy']:.3f} | {x['load_cv']:.3f} "
            f"| {x['nmi']:.3f} |"
        )
    lines += [
        "",
        f"Mean pairwise JSD between the {len(report['clients']['usage'])} clients' u_c: "
        f"{head['clients_jsd']:.4f}",
        "",
        "| group | examples | loss | without top expert | without a random one | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["removal"]:
        lines.append(
            f"| {r['group']} | {r['examples']} | {r['loss']:.4f} | {r['loss_without_top']:.4f} "
            f"| {r['loss_without_random']:.4f} | {r['ratio']:.2f} |"
        )
    if "selection" in report:
        lines += [
            "",
            "Each client's loss without the experts it last updated, against as many random ones:",
            "",
            "| client | examples | experts removed | loss | without its selection "
            "| without random ones | ratio |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in report["selection"]:
            lines.append(
                f"| {r['partition']} | {r['examples']} | {r['experts_removed']} | "
                f"{r['loss']:.4f} | {r['loss_without_selected']:.4f} | "
                f"{r['loss_without_random']:.4f} | {r['ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _heatmaps(report: dict, path: Path, title: str) -> None:
    shares = np.asarray(report["shares"])  # (L, G, E)
    L, G, E = shares.shape
    fig, axes = plt.subplots(1, L, figsize=(3 + 0.5 * E * L, 1.5 + 0.35 * G), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        uniform = report["layers"][layer]["top_k"] / E
        image = ax.imshow(shares[layer] / uniform, cmap="viridis", vmin=0, aspect="auto")
        ax.set_title(f"MoE layer {layer}")
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        ax.set_yticks(range(G), report["groups"] if layer == 0 else [""] * G)
        fig.colorbar(image, ax=ax, label="share / (k/E)")
    fig.suptitle(f"{title}: each group's share of tokens per expert, against uniform")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
