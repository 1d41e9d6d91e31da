"""The comparison report: a results table and plots from finished run directories.

``hfedmoe report RUN_DIR... -o OUT`` groups runs by algorithm (several seeds of one method form
one row) and writes ``OUT/report.html`` (self-contained: plots embedded) and ``OUT/report.md``
(plots beside it as PNG files). Everything is computed from each run's metrics.jsonl and
summary.json, so a report can be rebuilt at any time from the run directories alone.

What it decides on is fixed before the results (:mod:`hfedmoe.experiment.protocol`): one
primary end point, whose paired comparisons with the reference method give the verdicts (Holm
over the setting's comparisons, :mod:`hfedmoe.experiment.paired`); every other end point is
shown as secondary, without a verdict.

Columns (METHOD.md §10):

* final test accuracy, mean +- std over seeds (sample std; 0 for one seed);
* rounds, client compute and time on the devices to the target accuracy: the median over all
  seeds, a seed that never reached the target counted as slower than every one that did
  (:func:`~hfedmoe.experiment.paired.censored_median`), with how many reached it;
* client compute: predicted training FLOPs summed over every client-round up to that round
  (``step_flops_predicted`` x steps, plus ``extra_flops_predicted``: forward passes outside
  training, and ``overlapped_flops_predicted``: those that overlap the server's aggregation,
  FLUX's stale profiling; a client that failed did no training);
* time on the devices: each round's slowest sampled client's predicted time, a failed
  client's included (:func:`~hfedmoe.experiment.paired.client_seconds`), summed;
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from hfedmoe.experiment import protocol
from hfedmoe.experiment.paired import (
    ALPHA,
    MIN_SEEDS,
    POWER,
    PairedDifference,
    ToTarget,
    detectable_difference,
    device_seconds,
    holm,
    paired_difference,
    to_target,
)
from hfedmoe.foundation.config import ReportConfig
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
    round_timeout: float | None = None  # config's federation.round_timeout
    setting: tuple[tuple[str, object], ...] = ()  # config's SETTING_KEYS, as the report says

    @classmethod
    def load(cls, path: Path) -> Run:
        summary_path = path / "summary.json"
        if not summary_path.is_file():
            raise HFedMoEError(f"'{path}' is not a finished run (no summary.json)")
        summary = json.loads(summary_path.read_text())
        lines = (path / "metrics.jsonl").read_text().splitlines()
        rounds = [json.loads(line) for line in lines if line.strip()]
        config = path / "config.toml"
        raw = tomllib.loads(config.read_text()) if config.is_file() else {}
        flops = {t.get("name", ""): t.get("flops") for t in raw.get("devices", {}).get("tiers", [])}
        return cls(
            path,
            summary["algorithm"],
            int(summary["seed"]),
            rounds,
            summary["algorithm"],
            flops,
            _lookup(raw, "federation.round_timeout"),
            tuple((key, _lookup(raw, key)) for key in SETTING_KEYS),
        )

    @property
    def grid(self) -> Path | None:
        """The ``compare`` grid the run belongs to (``GRID/<algorithm>/seed<k>``), else None."""
        path = self.path.absolute()
        if path.name == f"seed{self.seed}" and path.parent.name == self.algorithm:
            return path.parent.parent
        return None

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

    def device_seconds(self) -> np.ndarray | None:
        """Cumulative time on the devices after each round (round 0: 0), or None where a time
        is unknown: a client's tier declares no FLOP/s, or a client failed without a round
        timeout to bound it (:func:`hfedmoe.experiment.paired.device_seconds`)."""
        return device_seconds(self.rounds, self.tier_flops, self.round_timeout)

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
    if (grid := run.grid) is not None:
        return f"{grid if full else grid.name}/{run.algorithm}"
    path = run.path.absolute()
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
    # to the target, over all seeds (None: no target, or some seed's cost is unknown)
    rounds_to_target: ToTarget | None
    compute_to_target: ToTarget | None  # FLOPs
    device_seconds_to_target: ToTarget | None  # the slowest client's time per round, summed
    client_memory: float | None  # bytes: the largest client's, measured, mean over seeds
    failure_rate: float
    bytes_per_round: float
    utilisation_cv: float | None
    failures: dict[str, int]  # failed client trainings by reason, summed over seeds


def cost_to_target(
    group: list[Run], target: float | None, cost: Callable[[Run], np.ndarray | None]
) -> ToTarget | None:
    """A cumulative cost per round (``cost(run)``, round 0 first) at the round each seed first
    reaches ``target``, summarised over all seeds (:func:`hfedmoe.experiment.paired.to_target`:
    a seed that never reaches it counts). None without a target, or where a seed's cost is
    unknown: a median over the other seeds would again leave one out."""
    if target is None:
        return None
    costs = [cost(r) for r in group]
    if any(c is None for c in costs):
        return None
    reached = [r.rounds_to(target) for r in group]
    return to_target(
        [None if k is None else float(c[k]) for k, c in zip(reached, costs, strict=True)]
    )


def _rounds(run: Run) -> np.ndarray:
    return np.arange(len(run.rounds), dtype=float)


def summarise(runs: list[Run], target: float | None) -> list[Row]:
    """One row per algorithm, in the order algorithms first appear; the to-target columns are
    empty without a ``target``."""
    order = list(dict.fromkeys(r.label for r in runs))
    rows = []
    for algorithm in order:
        group = [r for r in runs if r.label == algorithm]
        finals = np.array([r.accuracy[-1] for r in group])
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
                rounds_to_target=cost_to_target(group, target, _rounds),
                compute_to_target=cost_to_target(group, target, Run.client_flops),
                device_seconds_to_target=cost_to_target(group, target, Run.device_seconds),
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


#: the paired table's steadier end point: the mean test accuracy of the last rounds
LAST_ROUNDS = 3


def last_rounds(run: Run) -> float:
    """The mean test accuracy of the last LAST_ROUNDS rounds: a round's accuracy moves by
    several points when 4 of 8 skewed clients are sampled, this is the steadier end point."""
    return float(run.accuracy[1:][-LAST_ROUNDS:].mean())


def final_accuracy(run: Run) -> float:
    return float(run.accuracy[-1])


def final_personal(run: Run) -> float | None:
    """The final round's mean per-client accuracy; None for runs recorded before it."""
    p = run.personal("personal_accuracy_mean")
    return None if p is None else float(p[-1])


@dataclass(frozen=True)
class EndPoint:
    """An accuracy end point of a run: one number per seed, compared seed by seed."""

    label: str
    value: Callable[[Run], float | None]


#: The end points the paired table compares, by the names ``[report] primary`` takes
#: (:data:`hfedmoe.foundation.config.PrimaryEndPoint`, which the config validates against).
END_POINTS: dict[str, EndPoint] = {
    "final": EndPoint("final accuracy", final_accuracy),
    "last-rounds": EndPoint(f"last {LAST_ROUNDS} rounds' mean accuracy", last_rounds),
    "per-client": EndPoint("per-client mean accuracy", final_personal),
}


def reference_row(runs: list[Run], reference: str) -> str:
    """The row every other is compared with: the first whose algorithm is ``reference`` (a row
    of one of several grids is ``GRID/<algorithm>``), else the first row."""
    labels = list(dict.fromkeys(r.label for r in runs))
    return next((r.label for r in runs if r.algorithm == reference), labels[0])


@dataclass(frozen=True)
class Comparison:
    """One method against the reference, seed by seed, on every end point; ``p_adjusted``: the
    primary end point's p-value after Holm's correction over the setting's comparisons."""

    label: str
    differences: dict[str, PairedDifference]
    p_adjusted: float


def compare_with(runs: list[Run], primary: str, reference: str) -> list[Comparison]:
    """Every other row against ``reference`` (a row label), on every end point; the primary's
    p-values corrected together (:func:`hfedmoe.experiment.paired.holm`)."""

    def per_seed(label: str, value: Callable[[Run], float | None]) -> dict[int, float]:
        return {r.seed: v for r in runs if r.label == label and (v := value(r)) is not None}

    labels = [label for label in dict.fromkeys(r.label for r in runs) if label != reference]
    differences = [
        {
            name: paired_difference(per_seed(label, e.value), per_seed(reference, e.value))
            for name, e in END_POINTS.items()
        }
        for label in labels
    ]
    adjusted = holm([d[primary].p if d[primary].testable else math.nan for d in differences])
    return [
        Comparison(label, d, p) for label, d, p in zip(labels, differences, adjusted, strict=True)
    ]


def family_size(comparisons: list[Comparison], primary: str) -> int:
    """How many comparisons Holm's correction counts: those with a test (enough seeds, some
    spread); the rest decide nothing either way."""
    return sum(c.differences[primary].testable for c in comparisons)


def _holm_header(tested: int) -> str:
    if tested == 0:
        return "p, Holm-adjusted (no comparison tested)"
    return f"p, Holm-adjusted over {tested} tested comparison{'s' if tested > 1 else ''}"


def _difference_cell(d: PairedDifference) -> str:
    """The mean difference, with its interval where there are enough seeds for one."""
    if not d.seeds:
        return "-"
    if math.isnan(d.low) or not d.enough_seeds:
        return f"{d.mean:+.4f}"
    return f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"


def _p_cell(p: float) -> str:
    if math.isnan(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _detectable(d: PairedDifference) -> float:
    """The smallest difference the seeds could detect; NaN (shown "-") below MIN_SEEDS."""
    if not d.enough_seeds:
        return math.nan
    return detectable_difference(d.sd, len(d.seeds))


def paired_table(
    comparisons: list[Comparison], primary: str, reference: str
) -> tuple[list[str], list[list[str]]]:
    """The comparisons as a table: the primary end point's difference with its 95% interval,
    its p-value, the Holm-adjusted p-value, the verdict they support, and the smallest
    difference the seeds could detect; then every secondary end point's difference and
    interval, without a verdict (:mod:`hfedmoe.experiment.paired`)."""
    secondary = [name for name in END_POINTS if name != primary]
    header = [
        "method",
        "paired seeds",
        f"primary: {END_POINTS[primary].label} - {reference} (95% CI)",
        "p (paired t)",
        _holm_header(family_size(comparisons, primary)),
        "verdict",
        f"detectable difference (power {POWER:g})",
        *(f"secondary: {END_POINTS[name].label} - {reference} (95% CI)" for name in secondary),
    ]
    rows = []
    for c in comparisons:
        d = c.differences[primary]
        detectable = _detectable(d)
        rows.append(
            [
                c.label,
                ",".join(map(str, d.seeds)) or "-",
                _difference_cell(d),
                _p_cell(d.p if d.enough_seeds else math.nan),
                _p_cell(c.p_adjusted),
                d.verdict(c.p_adjusted),
                "-" if math.isnan(detectable) else f"{detectable:.4f}",
                *(_difference_cell(c.differences[name]) for name in secondary),
            ]
        )
    return header, rows


def power_sentence(comparisons: list[Comparison], primary: str) -> str:
    """What difference the seeds could detect: the smallest true difference of the primary end
    point a two-sided paired t-test at ALPHA finds with probability POWER, from each
    comparison's spread of per-seed differences (before Holm's correction, which only raises
    it); empty where no comparison has a spread to compute it from."""
    found = [
        (len(c.differences[primary].seeds), x)
        for c in comparisons
        if not math.isnan(x := _detectable(c.differences[primary]))
    ]
    if not found:
        return ""
    seeds = sorted({n for n, _ in found})
    values = [x for _, x in found]
    span = f"{min(values):.4f}" if len(values) == 1 else f"{min(values):.4f} to {max(values):.4f}"
    return (
        f"With {'/'.join(map(str, seeds))} paired seeds, a two-sided paired t-test at {ALPHA:g} "
        f"detects a true difference in {END_POINTS[primary].label} of {span} with probability "
        f"{POWER:g} (median {np.median(values):.4f}; from each comparison's standard deviation "
        "of the per-seed differences, before Holm's correction, which only raises it): a tie "
        "does not rule out a smaller difference."
    )


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


def privacy_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Per method under ``[privacy]``: the epsilon its runs spent at their delta (the largest
    over seeds) and the noise multiplier; no rows where no run was private."""
    header = ["method", "epsilon", "delta", "noise multiplier"]
    cells = []
    for label in dict.fromkeys(r.label for r in runs):
        spent = [
            rec
            for r in runs
            if r.label == label
            for rec in r.rounds[-1:]
            if rec.get("dp_epsilon") is not None
        ]
        if spent:
            worst = max(spent, key=lambda rec: rec["dp_epsilon"])
            cells.append(
                [
                    label,
                    f"{worst['dp_epsilon']:.3g}",
                    f"{worst['dp_delta']:.1e}",
                    f"{worst['dp_noise_multiplier']:.3g}",
                ]
            )
    return header, cells


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


def plot_all(runs: list[Run], target: float | None) -> dict[str, plt.Figure]:
    """The report's figures by name (the target, where there is one, as a dotted line)."""
    groups = _by_algorithm(runs)
    figs: dict[str, plt.Figure] = {}

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, group in groups.items():
        _mean_band(ax, np.arange(len(group[0].rounds)), [r.accuracy for r in group], name)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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

#: the results table's columns that show an end point: by its name in END_POINTS, or "" for the
#: costs to the target, which are always secondary (censored: never tested)
COLUMN_END_POINTS = {
    "final accuracy": "final",
    "per-client accuracy (mean / worst / std over clients)": "per-client",
    "rounds to target": "",
    "client compute to target": "",
    "time to target on the devices": "",
}


def results_columns(primary: str) -> list[str]:
    """COLUMNS, each end point's column marked primary or secondary."""
    return [
        f"{c} ({'primary' if COLUMN_END_POINTS[c] == primary else 'secondary'})"
        if c in COLUMN_END_POINTS
        else c
        for c in COLUMNS
    ]


def _personal_cell(row: Row) -> str:
    if row.personal_mean is None:
        return "-"
    cell = f"{row.personal_mean:.4f} / {row.personal_worst:.4f}"
    return cell if row.personal_spread is None else f"{cell} / {row.personal_spread:.4f}"


def _to_target_cell(cost: ToTarget | None, unit: Callable[[float], str]) -> str:
    """The median cost with the share of seeds that reached the target ("-": no target, or a
    seed's cost unknown)."""
    if cost is None:
        return "-"
    share = f"{cost.reached} of {cost.seeds}"
    return f"not reached ({share})" if cost.median is None else f"{unit(cost.median)} ({share})"


def _cells(row: Row) -> list[str]:
    return [
        row.algorithm,
        ",".join(map(str, row.seeds)),
        f"{row.final_mean:.4f} ± {row.final_std:.4f}",
        _personal_cell(row),
        _to_target_cell(row.rounds_to_target, lambda k: f"{k:.0f}"),
        _to_target_cell(row.compute_to_target, lambda f: f"{f / 1e12:.1f} TFLOP"),
        _to_target_cell(row.device_seconds_to_target, lambda t: f"{t:,.0f} s"),
        "-" if row.client_memory is None else f"{row.client_memory / 2**20:,.0f} MiB",
        f"{row.failure_rate:.3f}",
        f"{row.bytes_per_round / 1e6:,.0f} MB",
        "-" if row.utilisation_cv is None else f"{row.utilisation_cv:.3f}",
    ]


@dataclass(frozen=True)
class Table:
    """One table of the report, rendered alike as Markdown and as HTML: a title (a heading;
    None for the results table, which the page opens with), what is said before and after it,
    and its cells."""

    table_id: str
    title: str | None
    header: list[str]
    rows: list[list[str]]
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    def markdown(self) -> list[str]:
        heading = [f"## {self.title}", ""] if self.title else []
        lines = [
            "| " + " | ".join(self.header) + " |",
            "|" + "---|" * len(self.header),
            *["| " + " | ".join(r) + " |" for r in self.rows],
        ]
        said = [[line, ""] for line in self.before], [["", line] for line in self.after]
        return [
            *heading,
            *(x for pair in said[0] for x in pair),
            *lines,
            *(x for pair in said[1] for x in pair),
            "",
        ]

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self.rows
        )
        table = (
            f'<table id="{self.table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>"
        )
        heading = f"<h2>{html.escape(self.title)}</h2>" if self.title else ""
        before = "".join(f"<p>{html.escape(line)}</p>" for line in self.before)
        after = "".join(f"<p>{html.escape(line)}</p>" for line in self.after)
        return heading + before + table + after


#: how the costs to the target are summarised, as the report says it under the table
TO_TARGET_NOTE = (
    "Rounds, client compute and time to target: the median over all seeds, a seed that never "
    "reached the target counted as slower than every seed that did (censored at its total "
    "cost); 'not reached' when fewer than half of the seeds reached it; (k of n): the seeds "
    "that reached it. Compute is the predicted training FLOPs of all clients up to the round "
    "that reaches the target."
)
#: what a round's time on the devices counts (hfedmoe.experiment.paired.client_seconds)
DEVICE_TIME_NOTE = (
    "Time on the devices: each round's slowest sampled client's predicted time (its FLOPs "
    "over its tier's FLOP/s), summed over rounds; a failed client counts too. A client "
    "refused over its budget (a device asked beyond its memory or deadline) spends nothing: "
    "its device refuses the request before training. Any other failed client (it raised, "
    "died, replied late or not at all, or sent a reply the server rejected) counts the round "
    "timeout, the longest the server waits for it; without a round timeout the time it spent "
    "is not recorded and the run has no device time (-)."
)

#: what the results table's memory, utilisation and failure columns measure
COLUMNS_NOTE = (
    "Client memory: the largest client's weights held while training plus its training's "
    "peak RSS increase (a device tier's memory bounds the cost model's prediction of the "
    "same, docs/BUDGETS.md). Utilisation CV: the coefficient of variation of the per-expert "
    "update counts over the run (0: every expert trained equally often). Failure rate: the "
    "share of sampled client trainings that failed, a device asked beyond its memory or "
    "deadline included (the failures table gives the reasons)."
)


def protocol_sentence(used: ReportConfig, reference: str) -> str:
    """The first thing the report says: what its verdicts follow."""
    target = "none declared" if used.target is None else f"{used.target:g}"
    return (
        f"Primary end point: {END_POINTS[used.primary].label} ([report] primary = "
        f"'{used.primary}'); the verdicts follow it alone, and every other end point is "
        f"secondary: described, not tested. Target accuracy: {target}. Reference: {reference}."
    )


def paired_sentence(primary: str, comparisons: int) -> str:
    """How the paired table's verdicts are reached, above it (``comparisons``: how many have
    a test)."""
    over = (
        f"over the {comparisons} tested comparison{'s' if comparisons != 1 else ''} with the "
        "reference"
        if comparisons
        else "over the tested comparisons (none here)"
    )
    return (
        "Mean of the per-seed differences (same partitions, tiers and initial weights) with a "
        f"95% t-interval from {MIN_SEEDS} paired seeds on. The verdict follows the primary end "
        f"point ({END_POINTS[primary].label}): ahead or behind where the two-sided paired "
        f"t-test's p-value, adjusted by Holm's procedure {over}, is below {ALPHA:g} and the "
        f"interval agrees; tied otherwise; n/a with fewer than {MIN_SEEDS} paired seeds or "
        "differences with no spread (those are not tested). Secondary end points have no "
        "verdict."
    )


#: the config keys the report's first lines state, so that a reader knows what was run (a
#: quick profile's 3 rounds on a data subset, say) without opening a config.toml
SETTING_KEYS = (
    "name",
    "federation.rounds",
    "federation.clients_per_round",
    "federation.num_clients",
    "train.local_steps",
    "data.max_train_examples",
    "data.max_test_examples",
)


def _lookup(raw: Mapping[str, object], dotted: str) -> object:
    """A dotted key's value in a parsed config.toml; None where it is absent."""
    value: object = raw
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def setting_sentence(runs: list[Run]) -> str | None:
    """What was run, from the runs' own config.toml: the config's name, rounds, clients and
    local steps, and any cap on the data; a key whose value differs between runs lists each
    value. None for runs without a config.toml."""
    values: dict[str, list[object]] = {}
    for r in runs:
        for key, value in r.setting:
            if value not in values.setdefault(key, []):
                values[key].append(value)
    if not values or all(v == [None] for v in values.values()):
        return None

    def said(key: str) -> str:
        return " or ".join("none" if v is None else str(v) for v in values.get(key, [None]))

    caps = [
        f"{what} at most {said(key)} examples"
        for what, key in (
            ("training", "data.max_train_examples"),
            ("test", "data.max_test_examples"),
        )
        if values.get(key, [None]) != [None]
    ]
    return (
        f"Setting: config '{said('name')}', {said('federation.rounds')} rounds, "
        f"{said('federation.clients_per_round')} of {said('federation.num_clients')} clients a "
        f"round, {said('train.local_steps')} local steps a client"
        + (f"; data capped: {', '.join(caps)}" if caps else "")
        + " (each run's config.toml holds the rest)."
    )


def seeds_warning(runs: list[Run]) -> str | None:
    """The report's warning where no method has MIN_SEEDS seeds (after any about a changed
    end point): its differences describe these runs and decide nothing."""
    most = max(len({r.seed for r in runs if r.label == label}) for label in {r.label for r in runs})
    if most >= MIN_SEEDS:
        return None
    return (
        f"{most} seed{'s' if most > 1 else ''} per method: the differences below describe "
        f"these runs and decide nothing (a verdict needs at least {MIN_SEEDS} paired seeds; "
        "EXPERIMENTS.md asks for 5)."
    )


def resolve_protocol(
    runs: list[Run], requested: Mapping[str, object], change: bool
) -> protocol.Resolved:
    """The protocol the report follows: each grid's record (a run outside a grid counts as
    unrecorded), checked against the report's options (:func:`protocol.resolve`)."""
    records: dict[Path, protocol.Record | None] = {}
    for r in runs:
        where = r.grid or r.path.absolute()
        if where not in records:
            records[where] = protocol.read(where) if r.grid is not None else None
    return protocol.resolve(records, requested, change)


def report_tables(
    runs: list[Run], rows: list[Row], used: ReportConfig, reference: str
) -> list[Table]:
    """Every table of the report, in order; a table with nothing to show is left out."""
    results = Table(
        "results",
        None,
        results_columns(used.primary),
        [_cells(r) for r in rows],
        before=("Mean ± sample std over seeds.",),
        after=(TO_TARGET_NOTE, DEVICE_TIME_NOTE, COLUMNS_NOTE),
    )
    tables = [results]
    if len({r.label for r in runs}) > 1:
        comparisons = compare_with(runs, used.primary, reference)
        header, cells = paired_table(comparisons, used.primary, reference)
        explained = paired_sentence(used.primary, family_size(comparisons, used.primary))
        power = power_sentence(comparisons, used.primary)
        after = (power,) if power else ()
        tables.append(Table("paired", "Paired by seed", header, cells, (explained,), after))
    if len({r.seed for r in runs}) > 1:
        tables.append(Table("per-seed", "Per seed", *per_seed_table(runs)))
    header, cells = why_table(runs)
    if cells:
        before = (
            "Mean over rounds and seeds. Equation numbers are those of docs/METHOD.md, which "
            "defines each measure.",
        )
        tables.append(Table("why", "Why, measured", header, cells, before))
    header, cells = memory_tier_table(runs)
    if len(header) > 1:
        title = "Client memory per device tier"
        before = (
            "The largest measured, mean over seeds. In the embedded engine the clients and the "
            "server share one process and its heap, so a measured peak can exceed the tier's "
            "memory that the cost model's prediction fits (docs/BUDGETS.md compares the two).",
        )
        tables.append(Table("memory", title, header, cells, before))
    header, cells = privacy_table(runs)
    if cells:
        before = ("Spent by the last round, the largest over seeds.",)
        tables.append(Table("privacy", "Differential privacy", header, cells, before))
    reasons, cells = failure_reasons_table(rows)
    if reasons:
        title, before = "Failed client trainings by reason", ("Summed over seeds.",)
        tables.append(Table("failures", title, ["method", *reasons], cells, before))
    return tables


def write_report(
    run_dirs: list[Path],
    out_dir: Path,
    requested: Mapping[str, object] | None = None,
    title: str = "",
    change: bool = False,
) -> Path:
    """Write report.html, report.md and the PNGs into ``out_dir``; return the HTML path.
    ``requested``: the report's ``primary`` and ``target`` (None: as recorded with the grids);
    one that differs from a grid's record is refused unless ``change``, and then stated at the
    top of the report."""
    runs = label_runs([Run.load(Path(p)) for p in run_dirs])
    if not runs:
        raise HFedMoEError("report: no run directories given")
    resolved = resolve_protocol(runs, requested or {}, change)
    used = resolved.protocol
    reference = reference_row(runs, used.reference)
    warnings = list(resolved.warnings)
    if few := seeds_warning(runs):  # after a changed end point, the gravest
        warnings.append(few)
    if not any(r.label == reference and r.algorithm == used.reference for r in runs):
        warnings.append(
            f"The reference '{used.reference}' is not among the runs: every method is compared "
            f"with {reference} instead."
        )
    rows = summarise(runs, used.target)
    figs = plot_all(runs, used.target)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or f"hfedmoe comparison ({len(runs)} runs)"
    sources = "".join(f"<li><code>{html.escape(str(r.path))}</code></li>" for r in runs)
    setting = setting_sentence(runs)
    opening = [*([setting] if setting else []), protocol_sentence(used, reference)]
    opening += resolved.notes

    tables = report_tables(runs, rows, used, reference)
    md = [f"# {title}", "", *(f"**Warning: {w}**\n" for w in warnings)]
    md += [*(f"{line}\n" for line in opening)]
    for table in tables:
        md += table.markdown()
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

    warnings_html = "".join(
        f'<p class="warning"><strong>Warning: {html.escape(w)}</strong></p>' for w in warnings
    )
    opening_html = "".join(f"<p>{html.escape(line)}</p>" for line in opening)
    tables_html = "\n".join(table.html() for table in tables)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: 0.85rem; display: block;
  overflow-x: auto; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ margin: 1.5rem 0; }} img {{ max-width: 100%; }}
.warning {{ border: 2px solid #b00; background: #fee; padding: 0.5rem 0.8rem; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{warnings_html}
{opening_html}
{tables_html}
{"".join(html_figs)}
<h2>Runs</h2><ul>{sources}</ul>
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path
