"""Tuning on validation data: every method over the same grid of values, on seeds that are never
reported, each method's value picked by its validation end point (``hfedmoe tune``).

``hfedmoe tune CONFIG --methods fedavg,hfedmoe --grid lr=[1e-5,3e-5,1e-4] --seeds 100,101``
runs ``OUT/<method>/<point>/seed<k>/`` for every method, grid point and tuning seed, as
``hfedmoe compare`` runs its cells (the same child processes, resume and locks). Then, per
method, the point with the best mean validation end point over the seeds wins (ties: the first
in grid order); the test split is never read. ``OUT/tuned.json`` keeps the choice, the seeds and
every trial, ``OUT/tuning.md`` the table, and ``hfedmoe compare --tuned OUT`` applies each
method's chosen values after the config's (a ``--set`` of a tuned key is refused there, and so
are the tuning seeds).

The grid's key ``lr`` is each method's own learning rate (:attr:`FederatedAlgorithm.RATE_KEY`:
``train.lr`` for most, ``fftmoe.lr`` for FFT-MoE's adapters). A key of a method's own section
(``hfedmoe.tau``) varies only that method's runs, so every method must get the same number of
trials: a grid that gives one method more is refused.
"""

from __future__ import annotations

import itertools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from hfedmoe.experiment.comparison import Cell
from hfedmoe.foundation.config import PLUGIN_SECTIONS
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.foundation.files import write_atomic

#: the grid key that means each method's own learning rate
RATE = "lr"

TUNED_FILE = "tuned.json"

#: how the validation end point reads a run's rounds: the report's primary end points
#: (``[report] primary``; ``experiment.report``) on the validation split
END_POINTS = {
    "final": lambda accuracies: accuracies[-1],
    "last-rounds": lambda accuracies: sum(accuracies[-3:]) / len(accuracies[-3:]),
}


@dataclass(frozen=True)
class GridKey:
    """One ``--grid KEY=[values]``: the key as given and the values to try."""

    key: str
    values: tuple[object, ...]


def parse_grid(items: list[str]) -> list[GridKey]:
    """``KEY=[v1, v2, ...]`` items (TOML lists; a bare value is a list of one)."""
    keys = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise HFedMoEError(f"--grid '{item}': expected KEY=[VALUES], e.g. lr=[1e-5,1e-4]")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raise HFedMoEError(f"--grid '{item}': the values are not a TOML list") from None
        values = tuple(value) if isinstance(value, list) else (value,)
        if not values:
            raise HFedMoEError(f"--grid '{item}': no values to try")
        if key in {k.key for k in keys}:
            raise HFedMoEError(f"--grid: '{key}' given twice")
        keys.append(GridKey(key, values))
    if not keys:
        raise HFedMoEError("--grid: give at least one KEY=[VALUES], e.g. lr=[1e-5,1e-4]")
    return keys


def method_keys(method: str, keys: list[GridKey]) -> list[tuple[str, GridKey]]:
    """The config key each grid key sets for ``method`` (``lr`` its own rate), and the grid key;
    a key of another method's section is left out."""
    from hfedmoe.algorithms import ALGORITHMS

    cls = ALGORITHMS.get(method)
    if cls is None:
        raise HFedMoEError(f"--methods: unknown algorithm '{method}'")
    # the sections one method family reads: the built-in ones and every plugin's own
    owned = {"hfedmoe", "fftmoe", "flux", *PLUGIN_SECTIONS}
    out = []
    for k in keys:
        section = k.key.split(".")[0]
        if k.key == RATE:
            out.append((cls.RATE_KEY, k))
        elif section not in owned or section == cls.SECTION:
            out.append((k.key, k))
    return out


def points(method: str, keys: list[GridKey]) -> list[tuple[str, ...]]:
    """The ``--set`` items of every grid point of ``method``, in grid order."""
    settable = method_keys(method, keys)
    combos = itertools.product(*(k.values for _, k in settable))
    return [
        tuple(f"{name}={_toml(v)}" for (name, _), v in zip(settable, combo, strict=True))
        for combo in combos
    ]


def _toml(value: object) -> str:
    """``value`` as a TOML literal (what ``--set`` parses back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def label(point: tuple[str, ...]) -> str:
    """A folder name for a grid point: its items joined, safe in a path."""
    return "_".join(item.replace("/", "-") for item in point) or "default"


def plan(out_dir: Path, methods: list[str], keys: list[GridKey], seeds: list[int]) -> list[Cell]:
    """Every (method, point, seed) cell, seed-major; refused unless every method gets the same
    number of trials."""
    trials = {m: len(points(m, keys)) for m in methods}
    if len(set(trials.values())) > 1:
        counts = ", ".join(f"{m} {n}" for m, n in trials.items())
        raise HFedMoEError(
            f"--grid: every method must get the same number of trials ({counts}); tune a "
            "method's own parameters within the same budget, or keep them at their defaults"
        )
    return [
        Cell(m, s, out_dir / m / label(p) / f"seed{s}", p)
        for s in seeds
        for m in methods
        for p in points(m, keys)
    ]


def validation_end_point(run_dir: Path, end_point: str) -> float:
    """A finished run's end point on its validation split (never its test split)."""
    from hfedmoe.results import read_metrics

    rounds = read_metrics(run_dir)
    accuracies = [r.get("validation_accuracy") for r in rounds[1:]]
    if not accuracies or any(a is None for a in accuracies):
        raise HFedMoEError(
            f"tune: '{run_dir}' has no validation metrics (data.validation_fraction)"
        )
    return float(END_POINTS[end_point](accuracies))


@dataclass(frozen=True)
class Choice:
    """A method's tuned values: the ``--set`` items of its best point and its mean validation
    end point there."""

    method: str
    sets: tuple[str, ...]
    score: float
    #: the chosen values that are the first or last of their key's grid (3 values or more): the
    #: best may lie beyond the grid, which only a wider grid can tell
    edge: tuple[str, ...] = ()


def grid_edges(points: list[tuple[str, ...]], chosen: tuple[str, ...]) -> tuple[str, ...]:
    """The items of ``chosen`` that are the lowest or highest value of their key in ``points``
    (the method's grid), for keys with at least 3 values: with 2, every choice is at an edge
    and the flag says nothing. Numbers are ordered by value, whatever order the grid lists
    them in; a key with a non-numeric value keeps the grid's order (first and last)."""
    edges = []
    for i, item in enumerate(chosen):
        values = list(dict.fromkeys(point[i] for point in points))
        if len(values) < 3:
            continue
        numbers = [_number(v) for v in values]
        if None not in numbers:
            values = [v for _, v in sorted(zip(numbers, values, strict=True))]
            low, high = "lowest", "highest"
        else:
            low, high = "first", "last"
        if item in (values[0], values[-1]):
            edges.append(f"{item} ({low if item == values[0] else high} tried)")
    return tuple(edges)


def _number(item: str) -> float | None:
    """The value of a ``key=value`` item as a number, or None where it is not one."""
    try:
        return float(item.partition("=")[2])
    except ValueError:
        return None


def choose(cells: list[Cell], end_point: str) -> tuple[dict[str, Choice], list[dict]]:
    """Each method's best point by the mean validation end point over the tuning seeds (ties:
    the first in grid order), and every trial's row. Unfinished cells are an error."""
    if missing := [c for c in cells if not c.done]:
        raise HFedMoEError(f"tune: {len(missing)} run(s) unfinished (rerun the same command)")
    trials = [
        {
            "method": c.method,
            "point": list(c.sets),
            "seed": c.seed,
            "validation": validation_end_point(c.run_dir, end_point),
        }
        for c in cells
    ]
    choices: dict[str, Choice] = {}
    for method in dict.fromkeys(c.method for c in cells):
        by_point: dict[tuple[str, ...], list[float]] = {}
        for t in trials:
            if t["method"] == method:
                by_point.setdefault(tuple(t["point"]), []).append(t["validation"])
        means = {p: sum(v) / len(v) for p, v in by_point.items()}
        best = max(means, key=lambda p: (means[p], -list(means).index(p)))
        choices[method] = Choice(method, best, means[best], grid_edges(list(means), best))
    return choices, trials


def write_choice(
    out_dir: Path,
    choices: dict[str, Choice],
    trials: list[dict],
    seeds: list[int],
    end_point: str,
    keys: list[GridKey],
) -> Path:
    """``OUT/tuned.json`` (what ``compare --tuned`` reads) and ``OUT/tuning.md``."""
    record = {
        "end_point": f"{end_point} validation accuracy",
        "seeds": seeds,
        "grid": {k.key: list(k.values) for k in keys},
        "methods": {
            m: {"sets": list(c.sets), "validation": c.score, "at_grid_edge": list(c.edge)}
            for m, c in choices.items()
        },
        "trials": trials,
    }
    write_atomic(out_dir / TUNED_FILE, json.dumps(record, indent=1) + "\n")
    lines = [
        f"# Tuning: {end_point} validation accuracy, mean over seeds {seeds}",
        "",
        "| method | values | validation | chosen |",
        "| --- | --- | --- | --- |",
    ]
    means: dict[tuple[str, tuple[str, ...]], list[float]] = {}
    for t in trials:
        means.setdefault((t["method"], tuple(t["point"])), []).append(t["validation"])
    for (method, point), values in means.items():
        mark = "yes" if choices[method].sets == point else ""
        mean = sum(values) / len(values)
        lines.append(f"| {method} | {', '.join(point)} | {mean:.4f} | {mark} |")
    edges = [f"{m}: {', '.join(c.edge)}" for m, c in choices.items() if c.edge]
    if edges:
        lines += ["", "Chosen at the edge of the grid (the best may lie beyond it):", ""]
        lines += [f"- {edge}" for edge in edges]
    write_atomic(out_dir / "tuning.md", "\n".join(lines) + "\n")
    return out_dir / TUNED_FILE


@dataclass(frozen=True)
class Tuned:
    """What ``compare --tuned`` applies: each method's chosen ``--set`` items, and the seeds
    the tuning used (never to be reported)."""

    sets: dict[str, tuple[str, ...]]
    seeds: tuple[int, ...]

    @classmethod
    def read(cls, tune_dir: Path) -> Tuned:
        path = tune_dir / TUNED_FILE
        try:
            record = json.loads(path.read_text())
            sets = {m: tuple(v["sets"]) for m, v in record["methods"].items()}
            return cls(sets, tuple(int(s) for s in record["seeds"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HFedMoEError(f"--tuned: '{path}' is not a finished tuning ({exc})") from None

    def cells(self, runs: list[Cell], base: list[str]) -> list[Cell]:
        """``runs`` with each method's tuned values; refused for a method the tuning did not
        cover, a tuning seed, or a ``--set`` of a tuned key (a config value never overrides a
        tuned one, and a tuned one is never set by hand)."""
        if seen := sorted({r.seed for r in runs} & set(self.seeds)):
            raise HFedMoEError(f"--seeds: {seen} tuned the values; report other seeds")
        out = []
        for run in runs:
            if run.method not in self.sets:
                raise HFedMoEError(f"--tuned: '{run.method}' was not tuned")
            tuned = {item.partition("=")[0] for item in self.sets[run.method]}
            if clash := sorted(tuned & {item.partition("=")[0].strip() for item in base}):
                raise HFedMoEError(f"--set {clash[0]}: tuned by --tuned; not set by hand")
            out.append(Cell(run.method, run.seed, run.run_dir, self.sets[run.method]))
        return out
