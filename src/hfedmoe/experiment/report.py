"""The comparison report: a results table and plots from finished run directories.

``hfedmoe report RUN_DIR... -o OUT`` groups runs by algorithm (several seeds of one method form
one row) and writes ``OUT/report.html`` (self-contained: plots embedded) and ``OUT/report.md``
(plots beside it as PNG files). Everything is computed from each run's metrics.jsonl and
summary.json, so a report can be rebuilt at any time from the run directories alone.

Columns (METHOD.md §10):

* final test accuracy, mean +- std over seeds (sample std; 0 for one seed);
* rounds to the target accuracy (mean over the seeds that reach it, and how many did);
* client compute to the target: predicted training FLOPs summed over every client-round up to
  that round (``step_flops_predicted`` x steps, plus ``extra_flops_predicted``: forward passes
  outside training, and ``overlapped_flops_predicted``: those that overlap the server's
  aggregation, FLUX's stale profiling; a client that failed did no training);
* client memory: the largest client's, measured (weights held while training + training's
  peak RSS increase), mean over seeds;
* training failure rate: failed / sampled client trainings;
* bytes per round, down + up, mean;
* expert-utilisation balance: the coefficient of variation of the per-expert update counts
  summed over the run (0 = every expert trained equally often).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import tomllib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from hfedmoe.experiment.paired import (
    MIN_SEEDS,
    device_seconds,
    device_seconds_to,
    paired_difference,
)
from hfedmoe.foundation.errors import HFedMoEError


@dataclass(frozen=True)
class Run:
    """One finished run, as the report needs it."""

    path: Path
    algorithm: str
    seed: int
    rounds: list[dict]  # metrics.jsonl, round 0 first
    label: str = ""  # the row it belongs to (default: its algorithm)
    tier_flops: dict[str, float | None] = field(default_factory=dict)  # config's device tiers

    @classmethod
    def load(cls, path: Path) -> Run:
        summary_path = path / "summary.json"
        if not summary_path.is_file():
            raise HFedMoEError(f"'{path}' is not a finished run (no summary.json)")
        summary = json.loads(summary_path.read_text())
        lines = (path / "metrics.jsonl").read_text().splitlines()
        rounds = [json.loads(line) for line in lines if line.strip()]
        config = path / "config.toml"
        tiers = (
            tomllib.loads(config.read_text()).get("devices", {}).get("tiers", [])
            if (config.is_file())
            else []
        )
        flops = {t.get("name", ""): t.get("flops") for t in tiers}
        return cls(
            path, summary["algorithm"], int(summary["seed"]), rounds, summary["algorithm"], flops
        )

    @property
    def accuracy(self) -> np.ndarray:
        return np.array([r["test_accuracy"] for r in self.rounds])

    def client_memory(self) -> float | None:
        """The largest memory a client used, measured: the weights it held while training plus
        training's peak RSS increase, over every successful client-round; None for runs that
        did not record both."""
        ok = [c for r in self.rounds for c in r["clients"] if c["status"] == "ok"]
        used = [
            c["memory_held_bytes"] + c["memory_measured_bytes"]
            for c in ok
            if c.get("memory_held_bytes") is not None and c.get("memory_measured_bytes") is not None
        ]
        return max(used) if used else None

    def memory_by_tier(self) -> dict[str, float]:
        """Per device tier, the largest memory a client of that tier used (weights held plus
        training's measured peak), over every successful client-round."""
        out: dict[str, float] = {}
        for r in self.rounds:
            for c in r["clients"]:
                held, peak = c.get("memory_held_bytes"), c.get("memory_measured_bytes")
                if c["status"] == "ok" and held is not None and peak is not None:
                    tier = c.get("tier") or "-"
                    out[tier] = max(out.get(tier, 0.0), held + peak)
        return out

    def device_seconds_to(self, target: float) -> float | None:
        """Time to ``target`` on the devices: the slowest client's predicted time, summed over
        rounds (:func:`hfedmoe.experiment.paired.device_seconds_to`)."""
        return device_seconds_to(self.rounds, target, self.tier_flops)

    def device_seconds(self) -> np.ndarray | None:
        """Cumulative time on the devices after each round (round 0: 0), or None where a
        client's tier declares no FLOP/s (:func:`hfedmoe.experiment.paired.device_seconds`)."""
        return device_seconds(self.rounds, self.tier_flops)

    def client_flops(self) -> np.ndarray | None:
        """Cumulative predicted training FLOPs of all clients after each round (round 0: 0);
        None for runs recorded before clients reported their step FLOPs."""
        ok = [c for r in self.rounds for c in r["clients"] if c["status"] == "ok"]
        if any(c.get("step_flops_predicted") is None or c.get("steps") is None for c in ok):
            return None
        per_round = [
            sum(
                (c.get("step_flops_predicted") or 0.0) * (c.get("steps") or 0)
                + (c.get("extra_flops_predicted") or 0.0)
                + (c.get("overlapped_flops_predicted") or 0.0)  # off the critical path, but spent
                for c in r["clients"]
                if c["status"] == "ok"
            )
            for r in self.rounds
        ]
        return np.cumsum(per_round)

    def failure_rate(self) -> float:
        sampled = sum(r["clients_ok"] + r["clients_failed"] for r in self.rounds)
        return sum(r["clients_failed"] for r in self.rounds) / sampled if sampled else 0.0

    def failure_rate_per_round(self) -> np.ndarray:
        return np.array(
            [
                r["clients_failed"] / max(r["clients_ok"] + r["clients_failed"], 1)
                for r in self.rounds[1:]
            ]
        )

    def failures_by_reason(self) -> dict[str, int]:
        """Failed client trainings over the run, by the reason the server gave."""
        return _sum_counts(r.get("failures") or {} for r in self.rounds)

    def bytes_per_round(self) -> np.ndarray:
        return np.array([r["bytes_down"] + r["bytes_up"] for r in self.rounds[1:]])

    def expert_updates(self) -> np.ndarray | None:
        """Per-expert update counts summed over every client of every round, flat (L x E);
        None if no expert was updated (a frozen-experts control: no utilisation to balance)."""
        rows = [
            c["expert_updates"]
            for r in self.rounds
            for c in r["clients"]
            if c.get("expert_updates")
        ]
        if not rows:
            return None
        total = np.sum(rows, axis=0)
        return total if total.any() else None

    def selection_matrix(self) -> tuple[list[int], np.ndarray] | None:
        """(partition, expert) update counts over the run, with the partition ids of the rows:
        the per-client heatmap."""
        rows: dict[int, np.ndarray] = {}
        for r in self.rounds:
            for c in r["clients"]:
                if c.get("expert_updates") and c.get("partition_id") is not None:
                    counts = np.array(c["expert_updates"])
                    rows[c["partition_id"]] = rows.get(c["partition_id"], 0) + counts
        if not rows:
            return None
        return sorted(rows), np.stack([rows[p] for p in sorted(rows)])

    def personal(self, key: str) -> np.ndarray | None:
        """``personal_accuracy_mean`` or ``_worst`` per round (METHOD.md §10's per-client
        view); None for runs recorded before per-client evaluation."""
        values = [r.get(key) for r in self.rounds]
        if any(v is None for v in values):
            return None
        return np.array(values, dtype=float)

    def rounds_to(self, target: float) -> int | None:
        hits = np.nonzero(self.accuracy >= target)[0]
        return int(hits[0]) if len(hits) else None


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among ``paths``: each path itself if it is a finished run, otherwise
    every finished run below it (a ``compare`` grid), in sorted order."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if (path / "summary.json").is_file():
            found.append(path)
        elif path.is_dir():
            below = sorted(
                p.parent for p in path.rglob("summary.json") if ".incomplete-" not in str(p.parent)
            )
            if not below:
                raise HFedMoEError(f"'{path}' holds no finished run (no summary.json)")
            found += below
        else:
            raise HFedMoEError(f"'{path}' is not a directory")
    return list({p.resolve(): p for p in found}.values())  # a run named twice counts once


def label_runs(runs: list[Run]) -> list[Run]:
    """Rows are algorithms, their seeds pooled. If one algorithm has the same seed twice, the
    runs come from several experiments: a run of a ``compare`` grid (``GRID/<algorithm>/seed<k>``)
    is then labelled ``GRID/<algorithm>``, pooling that grid's seeds; any other run is a row of
    its own, named by its directory (a sweep of settings)."""
    keys = [(r.algorithm, r.seed) for r in runs]
    if len(set(keys)) == len(keys):
        return runs
    labelled = [replace(r, label=_experiment_label(r)) for r in runs]
    if len({(r.label, r.seed) for r in labelled}) < len(runs):  # two grids of the same name
        labelled = [replace(r, label=_experiment_label(r, full=True)) for r in runs]
    return labelled


def _experiment_label(run: Run, full: bool = False) -> str:
    path = run.path.absolute()
    if path.name == f"seed{run.seed}" and path.parent.name == run.algorithm:
        grid = path.parent.parent
        return f"{grid if full else grid.name}/{run.algorithm}"
    return str(path) if full else path.name


def coefficient_of_variation(x: np.ndarray) -> float:
    mean = float(np.mean(x))
    return float(np.std(x) / mean) if mean > 0 else math.nan


@dataclass(frozen=True)
class Row:
    algorithm: str
    seeds: list[int]
    final_mean: float
    final_std: float
    personal_mean: float | None  # final per-client accuracy: mean over clients, then seeds
    personal_worst: float | None  # the worst client's, mean over seeds
    personal_spread: float | None  # the final per-client accuracies' std over clients, mean
    rounds_to_target: float | None
    reached: int
    compute_to_target: float | None  # FLOPs
    device_seconds_to_target: float | None  # the slowest client's time per round, summed
    client_memory: float | None  # bytes: the largest client's, measured, mean over seeds
    failure_rate: float
    bytes_per_round: float
    utilisation_cv: float | None
    failures: dict[str, int]  # failed client trainings by reason, summed over seeds


def summarise(runs: list[Run], target: float) -> list[Row]:
    """One row per algorithm, in the order algorithms first appear."""
    order = list(dict.fromkeys(r.label for r in runs))
    rows = []
    for algorithm in order:
        group = [r for r in runs if r.label == algorithm]
        finals = np.array([r.accuracy[-1] for r in group])
        hits = [(r, r.rounds_to(target)) for r in group]
        reached = [(r, k) for r, k in hits if k is not None]
        flops = [f[k] for r, k in reached if (f := r.client_flops()) is not None]
        updates = [u for r in group if (u := r.expert_updates()) is not None]
        memory = [m for r in group if (m := r.client_memory()) is not None]
        personal = {
            key: [p[-1] for r in group if (p := r.personal(f"personal_accuracy_{key}")) is not None]
            for key in ("mean", "worst")
        }
        spreads = [float(np.std(p)) for r in group if (p := r.rounds[-1].get("personal_accuracy"))]
        rows.append(
            Row(
                algorithm=algorithm,
                seeds=sorted(r.seed for r in group),
                final_mean=float(finals.mean()),
                final_std=float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
                personal_mean=float(np.mean(personal["mean"])) if personal["mean"] else None,
                personal_worst=float(np.mean(personal["worst"])) if personal["worst"] else None,
                personal_spread=float(np.mean(spreads)) if spreads else None,
                rounds_to_target=float(np.mean([k for _, k in reached])) if reached else None,
                reached=len(reached),
                compute_to_target=float(np.mean(flops)) if flops else None,
                device_seconds_to_target=(
                    float(np.mean(times))
                    if (
                        times := [
                            t for r, _ in reached if (t := r.device_seconds_to(target)) is not None
                        ]
                    )
                    else None
                ),
                client_memory=float(np.mean(memory)) if memory else None,
                failure_rate=float(np.mean([r.failure_rate() for r in group])),
                bytes_per_round=float(np.mean([r.bytes_per_round().mean() for r in group])),
                utilisation_cv=(
                    float(np.mean([coefficient_of_variation(u) for u in updates]))
                    if updates
                    else None
                ),
                failures=_sum_counts([r.failures_by_reason() for r in group]),
            )
        )
    return rows


#: the method the paired table compares every other with, when the report has it
REFERENCE = "hfedmoe"
#: the paired table's steadier end point: the mean test accuracy of the last rounds
LAST_ROUNDS = 3


def last_rounds(run: Run) -> float:
    """The mean test accuracy of the last LAST_ROUNDS rounds: a round's accuracy moves by
    several points when 4 of 8 skewed clients are sampled, this is the steadier end point."""
    return float(run.accuracy[1:][-LAST_ROUNDS:].mean())


def paired_table(
    runs: list[Run], reference: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """Every method against ``reference`` (default: HFedMoE, else the first method), seed by
    seed: the mean difference of final accuracy, of the last rounds' mean accuracy and of the
    final mean per-client accuracy, each with its 95% interval and the verdict it supports
    (:mod:`hfedmoe.experiment.paired`)."""
    labels = list(dict.fromkeys(r.label for r in runs))
    if reference is None:
        reference = REFERENCE if REFERENCE in labels else labels[0]

    def final(label: str, value) -> dict[int, float]:
        return {r.seed: v for r in runs if r.label == label and (v := value(r)) is not None}

    def accuracy(r: Run) -> float:
        return float(r.accuracy[-1])

    def personal(r: Run) -> float | None:
        p = r.personal("personal_accuracy_mean")
        return None if p is None else float(p[-1])

    header = [
        "method",
        "paired seeds",
        f"final accuracy - {reference} (95% CI)",
        "verdict",
        f"last {LAST_ROUNDS} rounds' mean accuracy - {reference} (95% CI)",
        "verdict",
        f"per-client mean - {reference} (95% CI)",
        "verdict",
    ]
    rows = []
    for label in labels:
        if label == reference:
            continue
        cells = [label]
        for value in (accuracy, last_rounds, personal):
            d = paired_difference(final(label, value), final(reference, value))
            if value is accuracy:
                cells.append(",".join(map(str, d.seeds)) or "-")
            if not d.seeds:
                cells += ["-", "-"]
            elif math.isnan(d.low):
                cells += [f"{d.mean:+.4f}", d.verdict]
            else:
                cells += [f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]", d.verdict]
        rows.append(cells)
    return header, rows


def per_seed_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Each method's final accuracy seed by seed, with the mean of its last rounds in
    brackets: the numbers the mean, the std and the paired intervals are made of."""
    seeds = sorted({r.seed for r in runs})
    header = ["method", *(f"seed {s}: final (last {LAST_ROUNDS} rounds' mean)" for s in seeds)]
    rows = []
    for label, group in _by_algorithm(runs).items():
        by_seed = {r.seed: r for r in group}
        cells = [label]
        for s in seeds:
            r = by_seed.get(s)
            cells.append("-" if r is None else f"{r.accuracy[-1]:.4f} ({last_rounds(r):.4f})")
        rows.append(cells)
    return header, rows


#: the "why" HFedMoE records each round (hfedmoe.algorithms.maths.diagnostics)
WHY = {
    "active_usage_overlap": "updated experts among the most used (eq. 15 vs 16)",
    "eq17_excluded_share": "expert updates eq. (17) leaves out",
    "router_weight_tv_mean": "router weights vs FedAvg's (TV distance, eq. 21)",
    "routing_consistency_mean": "routing consistency (eq. 18)",
}


#: the column of ``hfedmoe analyze RUN``'s selection measure (hfedmoe.analysis.selection)
SELECTION = "loss rise, each client's selection removed / random ones (pooled; per-run range)"


def selection_rises(run: Run) -> tuple[float, float] | None:
    """The loss rises summed over the run's clients, without their selections and without as
    many random experts (``hfedmoe analyze RUN``'s analysis/selection.json), or None where the
    run was not analysed."""
    path = run.path / "analysis" / "selection.json"
    if not path.is_file():
        return None
    body = json.loads(path.read_text())
    return body["rise_selected"], body["rise_random"]


def why_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """For methods that record them (HFedMoE and its ablations), each "why" measure averaged
    over rounds (clients, for the per-client overlap) and seeds; and for every method whose
    runs were analysed, the selection's loss rise over a random one's, pooled over clients and
    seeds. No rows for methods with neither."""
    rows = []
    for label in dict.fromkeys(r.label for r in runs):
        group = [r for r in runs if r.label == label]
        rises = [x for r in group if (x := selection_rises(r)) is not None]
        cells, found = [label], bool(rises)
        for key in WHY:
            values = [
                v
                for r in group
                for record in r.rounds[1:]
                for v in (
                    [c.get(key) for c in record["clients"]]
                    if key == "active_usage_overlap"
                    else [record.get(key)]
                )
                if v is not None
            ]
            found |= bool(values)
            cells.append(f"{np.mean(values):.3f}" if values else "-")
        cells.append(selection_cell(rises))
        if found:
            rows.append(cells)
    return ["method", *WHY.values(), SELECTION], rows


def selection_cell(rises: list[tuple[float, float]]) -> str:
    """The selection-removal ratio pooled over runs (summed rises), with the range of the
    per-run ratios beside it: one run's ratio moves a lot between seeds, and the pooled number
    alone hides that. A run whose random removal did not raise the loss has no ratio and is
    counted as undefined."""
    selected, random = (sum(x) for x in zip(*rises, strict=True)) if rises else (0.0, 0.0)
    if random <= 0:
        return "-"
    if len(rises) == 1:
        return f"{selected / random:.2f} (1 run)"
    ratios = [s / r for s, r in rises if r > 0]
    notes = [f"{len(rises)} runs"]
    if ratios:
        notes.append(f"per run {min(ratios):.2f} to {max(ratios):.2f}")
    if len(ratios) < len(rises):
        notes.append(f"{len(rises) - len(ratios)} undefined")
    return f"{selected / random:.2f} ({'; '.join(notes)})"


def memory_tier_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Per method and device tier, the largest client memory measured (mean over seeds)."""
    tiers = sorted({t for r in runs for t in r.memory_by_tier()})
    rows = []
    for label in dict.fromkeys(r.label for r in runs):
        per_seed = [r.memory_by_tier() for r in runs if r.label == label]
        cells = [label]
        for tier in tiers:
            values = [m[tier] for m in per_seed if tier in m]
            cells.append(f"{np.mean(values) / 2**20:,.0f} MiB" if values else "-")
        rows.append(cells)
    return ["method", *tiers], rows


def _sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)  # unlike Counter's +, keeps a reason counted 0
    return dict(sorted(total.items()))


def failure_reasons_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Failed client trainings by reason (columns) per row, summed over seeds; no columns if
    nothing failed."""
    reasons = sorted({k for r in rows for k in r.failures})
    cells = [[r.algorithm, *(str(r.failures.get(k, 0)) for k in reasons)] for r in rows]
    return reasons, cells


# ---- plots ------------------------------------------------------------------------------


def _by_algorithm(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.label, []).append(r)
    return out


def _mean_band(ax, x, ys, label) -> None:
    n = min(len(y) for y in ys)
    arr = np.stack([y[:n] for y in ys])
    mean = arr.mean(0)
    (line,) = ax.plot(x[:n], mean, label=label)
    if len(ys) > 1:
        ax.fill_between(x[:n], arr.min(0), arr.max(0), color=line.get_color(), alpha=0.15)


def _per_round(groups: dict[str, list[Run]], value, **axes) -> plt.Figure:
    """A figure of ``value(run)`` for rounds 1..R: mean and min-max band per row."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, group in groups.items():
        _mean_band(ax, np.arange(1, len(group[0].rounds)), [value(r) for r in group], name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", **axes)
    ax.legend(fontsize=8)
    return fig


def _accuracy_against(
    groups: dict[str, list[Run]], x, target: float | None = None, **axes
) -> plt.Figure:
    """Each run's accuracy per round against ``x(run)`` (a cumulative cost per round), a colour
    per row; with a dotted line at ``target`` if one is given."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, (name, group) in enumerate(groups.items()):
        for i, r in enumerate(group):
            ax.plot(x(r), r.accuracy, color=f"C{n}", label=None if i else name)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    ax.set(ylabel="test accuracy", **axes)
    ax.legend(fontsize=8)
    return fig


def plot_all(runs: list[Run], target: float) -> dict[str, plt.Figure]:
    """The report's figures by name."""
    groups = _by_algorithm(runs)
    figs: dict[str, plt.Figure] = {}

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, group in groups.items():
        _mean_band(ax, np.arange(len(group[0].rounds)), [r.accuracy for r in group], name)
    ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    ax.set(xlabel="round", ylabel="test accuracy", title="Accuracy per round (mean, min-max band)")
    ax.legend(fontsize=8)
    figs["accuracy"] = fig

    if all(r.client_flops() is not None for r in runs):
        figs["compute"] = _accuracy_against(
            groups,
            lambda r: r.client_flops() / 1e12,
            xlabel="cumulative client training compute (TFLOP, predicted)",
            title="Accuracy against client compute",
        )

    if all(r.device_seconds() is not None for r in runs):
        figs["device_time"] = _accuracy_against(
            groups,
            Run.device_seconds,
            target,
            xlabel="time on the devices (s): each round's slowest client's FLOPs / its FLOP/s",
            title="Accuracy against time on the devices",
        )

    if all(r.personal("personal_accuracy_mean") is not None for r in runs):
        fig, ax = plt.subplots(figsize=(7, 4))
        for n, (name, group) in enumerate(groups.items()):
            x = np.arange(len(group[0].rounds))
            _mean_band(ax, x, [r.personal("personal_accuracy_mean") for r in group], name)
            worst = [r.personal("personal_accuracy_worst") for r in group]
            k = min(len(w) for w in worst)  # as _mean_band: the rounds every seed has
            ax.plot(x[:k], np.mean([w[:k] for w in worst], axis=0), color=f"C{n}", linestyle=":")
        ax.set(
            xlabel="round",
            ylabel="accuracy on the client's own distribution",
            title="Per-client accuracy (mean over clients; dotted: the worst client)",
        )
        ax.legend(fontsize=8)
        figs["personal"] = fig

    figs["failures"] = _per_round(
        groups,
        Run.failure_rate_per_round,
        ylabel="failed / sampled",
        title="Training failure rate per round",
        ylim=(-0.05, 1.05),
    )
    figs["bytes"] = _per_round(
        groups,
        lambda r: r.bytes_per_round() / 1e6,
        ylabel="MB (down + up)",
        title="Bytes per round",
    )

    heat = [(name, g[0].selection_matrix()) for name, g in groups.items()]
    heat = [(n, m) for n, m in heat if m is not None]
    if heat:
        fig, axes = plt.subplots(
            len(heat), 1, figsize=(7, 1.2 + 1.1 * len(heat) * 1.6), squeeze=False
        )
        for ax, (name, (ids, m)) in zip(axes[:, 0], heat, strict=True):
            im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_yticks(range(len(ids)), [str(p) for p in ids])
            ax.set(
                title=f"{name} (seed {groups[name][0].seed})",
                xlabel="expert (layer x E + e)",
                ylabel="client (partition)",
            )
            fig.colorbar(im, ax=ax, label="batches updated")
        fig.suptitle("Per-client expert selection over the run")
        fig.tight_layout()
        figs["selection"] = fig
    for f in figs.values():
        f.tight_layout()
    return figs


# ---- writing ----------------------------------------------------------------------------

COLUMNS = [
    "method",
    "seeds",
    "final accuracy",
    "per-client accuracy (mean / worst / std over clients)",
    "rounds to target",
    "client compute to target",
    "time to target on the devices",
    "client memory, largest (measured)",
    "failure rate",
    "bytes / round",
    "utilisation CV",
]


def _personal_cell(row: Row) -> str:
    if row.personal_mean is None:
        return "-"
    cell = f"{row.personal_mean:.4f} / {row.personal_worst:.4f}"
    return cell if row.personal_spread is None else f"{cell} / {row.personal_spread:.4f}"


def _cells(row: Row) -> list[str]:
    return [
        row.algorithm,
        ",".join(map(str, row.seeds)),
        f"{row.final_mean:.4f} ± {row.final_std:.4f}",
        _personal_cell(row),
        "-"
        if row.rounds_to_target is None
        else f"{row.rounds_to_target:.1f} ({row.reached}/{len(row.seeds)})",
        "-" if row.compute_to_target is None else f"{row.compute_to_target / 1e12:.1f} TFLOP",
        "-" if row.device_seconds_to_target is None else f"{row.device_seconds_to_target:,.0f} s",
        "-" if row.client_memory is None else f"{row.client_memory / 2**20:,.0f} MiB",
        f"{row.failure_rate:.3f}",
        f"{row.bytes_per_round / 1e6:,.0f} MB",
        "-" if row.utilisation_cv is None else f"{row.utilisation_cv:.3f}",
    ]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def _html_table(table_id: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def write_report(run_dirs: list[Path], out_dir: Path, target: float, title: str = "") -> Path:
    """Write report.html, report.md and the PNGs into ``out_dir``; return the HTML path."""
    runs = label_runs([Run.load(Path(p)) for p in run_dirs])
    if not runs:
        raise HFedMoEError("report: no run directories given")
    rows = summarise(runs, target)
    figs = plot_all(runs, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or f"hfedmoe comparison ({len(runs)} runs)"
    sources = "".join(f"<li><code>{html.escape(str(r.path))}</code></li>" for r in runs)

    md = [f"# {title}", "", f"Target accuracy: {target:g}.", ""]
    results = [_cells(r) for r in rows]
    md += [*_md_table(COLUMNS, results), ""]
    extra_html = ""
    if len({r.label for r in runs}) > 1:
        header, cells = paired_table(runs)
        md += ["Paired by seed (same partitions, tiers and initial weights):", ""]
        md += [*_md_table(header, cells), ""]
        extra_html += (
            "<h2>Paired by seed</h2><p>Mean of the per-seed differences with a 95% t-interval; "
            "the verdict follows the interval (ahead: above 0, behind: below, tied: holds 0; "
            f"n/a: fewer than {MIN_SEEDS} paired seeds, or differences with no spread)."
            "</p>" + _html_table("paired", header, cells)
        )
    if len({r.seed for r in runs}) > 1:
        header, cells = per_seed_table(runs)
        md += ["Per seed:", "", *_md_table(header, cells), ""]
        extra_html += "<h2>Per seed</h2>" + _html_table("per-seed", header, cells)
    header, cells = why_table(runs)
    if cells:
        md += ["Why, measured (mean over rounds and seeds):", ""]
        md += [*_md_table(header, cells), ""]
        extra_html += "<h2>Why, measured</h2>" + _html_table("why", header, cells)
    header, cells = memory_tier_table(runs)
    if len(header) > 1:
        md += ["Client memory per device tier, largest measured (mean over seeds):", ""]
        md += [*_md_table(header, cells), ""]
        extra_html += "<h2>Client memory per device tier</h2>" + _html_table(
            "memory", header, cells
        )
    reasons, reason_cells = failure_reasons_table(rows)
    reasons_html = ""
    if reasons:
        md += ["Failed client trainings by reason (summed over seeds):", ""]
        md += [*_md_table(["method", *reasons], reason_cells), ""]
        reasons_html = (
            "<h2>Failed client trainings by reason</h2><p>Summed over seeds.</p>"
            + _html_table("failures", ["method", *reasons], reason_cells)
        )
    html_figs = []
    for name, fig in figs.items():
        fig.savefig(out_dir / f"{name}.png", dpi=110)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        data = base64.b64encode(buf.getvalue()).decode()
        md.append(f"![{name}]({name}.png)")
        html_figs.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}"></figure>')
    md += ["", "Runs:", *[f"- `{r.path}`" for r in runs], ""]
    (out_dir / "report.md").write_text("\n".join(md))

    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ margin: 1.5rem 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Target accuracy: {target:g}. Mean ± sample std over seeds; compute is predicted training
FLOPs of all clients up to the round that reaches the target; device time sums, over those
rounds, the slowest participating client's predicted time on its tier's FLOP/s.</p>
{_html_table("results", COLUMNS, results)}
{extra_html}
{reasons_html}
{"".join(html_figs)}
<h2>Runs</h2><ul>{sources}</ul>
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path
