"""The analysis fixed before the results: a grid's primary end point, target and reference.

A comparison whose end point was picked after its numbers were seen can be dismissed: among
several end points one usually favours somebody. So the experiment declares them in its
``[report]`` section (:class:`~hfedmoe.foundation.config.ReportConfig`), ``hfedmoe compare``
records them in the grid directory (``GRID/protocol.json``) when it first runs (:func:`fix`),
and once any run of the grid has finished, a later ``compare`` or ``hfedmoe report`` that
chooses otherwise is refused unless asked with ``--change-end-point`` (:func:`resolve`); the
report then says so at its top, naming the recorded choice and the new one. A grid run before
the record existed has none: its report says that its end point was not fixed in advance.

``protocol.json``::

    {"protocol": {"primary": "final", "target": 0.9, "reference": "hfedmoe"},
     "recorded_after_runs": 0,            # runs of the grid finished when it was recorded
     "replaced": [{"protocol": {...}, "after_runs": 4}]}   # earlier ones, --change-end-point
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hfedmoe.foundation.config import ReportConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.foundation.files import write_atomic, writing

PROTOCOL_FILE = "protocol.json"
#: the flag that allows a change after results, as both commands spell it
CHANGE_FLAG = "--change-end-point"


@dataclass(frozen=True)
class Replaced:
    """A protocol replaced with ``--change-end-point`` after ``after_runs`` runs finished."""

    protocol: ReportConfig
    after_runs: int


@dataclass(frozen=True)
class Record:
    """What a grid's ``protocol.json`` holds."""

    protocol: ReportConfig
    recorded_after_runs: int = 0  # 0: fixed in advance
    replaced: tuple[Replaced, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        body = {
            "protocol": self.protocol.model_dump(),
            "recorded_after_runs": self.recorded_after_runs,
            "replaced": [
                {"protocol": r.protocol.model_dump(), "after_runs": r.after_runs}
                for r in self.replaced
            ],
        }
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Record:
        body = json.loads(text)
        return cls(
            ReportConfig.model_validate(body["protocol"]),
            int(body.get("recorded_after_runs", 0)),
            tuple(
                Replaced(ReportConfig.model_validate(r["protocol"]), int(r["after_runs"]))
                for r in body.get("replaced", [])
            ),
        )


def describe(protocol: ReportConfig) -> str:
    """One phrase naming a protocol's choices, as errors and the report quote it."""
    target = "none" if protocol.target is None else f"{protocol.target:g}"
    return f"primary '{protocol.primary}', target {target}, reference '{protocol.reference}'"


def read(grid: Path) -> Record | None:
    """The grid's record, or None for a grid without one (run before records existed)."""
    path = grid / PROTOCOL_FILE
    if not path.is_file():
        return None
    try:
        return Record.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as exc:  # pydantic's errors are ValueErrors
        raise HFedMoEError(f"'{path}' is not a protocol record ({exc}); restore it") from None


_SEED_DIR = re.compile(r"seed\d+")


def finished_runs(grid: Path) -> int:
    """Finished runs anywhere in the grid (``<method>/seed<k>/summary.json``), whichever
    ``compare`` ran them; runs set aside (``seed<k>.incomplete-<n>``) do not count."""
    return sum(1 for p in grid.glob("*/seed*/summary.json") if _SEED_DIR.fullmatch(p.parent.name))


def fix(grid: Path, wanted: ReportConfig, change: bool = False) -> Record:
    """``hfedmoe compare``'s step before it runs anything: record ``wanted`` with the grid, or
    check it against the record. Before any run has finished a different choice replaces the
    record (no result has been seen); after, it is refused unless ``change``, and the change is
    kept in the record for the report to state. Returns the record now on disk."""
    record, finished = read(grid), finished_runs(grid)
    if record is not None and record.protocol == wanted:
        return record
    if record is None or finished == 0:
        new = Record(wanted, finished)
    else:
        if not change:
            raise HFedMoEError(_refusal(grid, record, wanted, finished, "[report]"))
        new = Record(
            wanted,
            record.recorded_after_runs,
            (*record.replaced, Replaced(record.protocol, finished)),
        )
    with writing(grid):
        grid.mkdir(parents=True, exist_ok=True)
    write_atomic(grid / PROTOCOL_FILE, new.to_json())
    return new


def _when(record: Record) -> str:
    """When the record was made, as the refusal and the report say it."""
    if record.recorded_after_runs:
        return f"after {record.recorded_after_runs} of its runs had finished"
    return "before its results"


def _refusal(grid: Path, record: Record, wanted: ReportConfig, runs: int, how: str) -> str:
    return (
        f"{grid}: the grid's end point was recorded {_when(record)} "
        f"({describe(record.protocol)}); {describe(wanted)} is asked for after {runs} of its "
        f"runs finished (keep {how} as recorded, or pass {CHANGE_FLAG}, which the report will "
        "state)"
    )


@dataclass(frozen=True)
class Resolved:
    """The protocol a report follows, and what it must say about where that came from:
    ``warnings`` (a change after results, stated at the top) and ``notes``."""

    protocol: ReportConfig
    warnings: list[str]
    notes: list[str]


def resolve(
    records: Mapping[Path, Record | None],
    requested: Mapping[str, object],
    change: bool = False,
) -> Resolved:
    """The protocol of a report over the runs of the grids in ``records`` (each grid's record;
    None for a grid without one, and for a run outside any grid, keyed by its own path).
    ``requested``: the report's options (``primary``, ``target``), None where not given (then
    the record's, or the default). Every grid reported has finished runs, so a choice that
    differs from a grid's record is refused unless ``change``; the report then warns, naming
    both."""
    recorded = {g: r for g, r in records.items() if r is not None}
    base = next(iter(recorded.values())).protocol if recorded else ReportConfig()
    chosen = {k: v for k, v in requested.items() if v is not None}
    protocol = ReportConfig.model_validate({**base.model_dump(), **chosen})
    warnings, notes = [], []
    for grid, record in recorded.items():
        if record.protocol != protocol:
            if not change:
                runs = finished_runs(grid)
                raise HFedMoEError(_refusal(grid, record, protocol, runs, "--primary and --target"))
            warnings.append(
                f"The end point was changed after the results ({CHANGE_FLAG}): {grid} recorded "
                f"{describe(record.protocol)} {_when(record)}; this report uses "
                f"{describe(protocol)}."
            )
        # each replaced protocol, and the one that replaced it: the next, or the one in force
        successors = [r.protocol for r in record.replaced[1:]] + [record.protocol]
        for old, new in zip(record.replaced, successors, strict=False):
            warnings.append(
                f"The end point was changed after the results ({CHANGE_FLAG}): {grid} recorded "
                f"{describe(old.protocol)}, replaced by {describe(new)} after {old.after_runs} "
                "of its runs had finished."
            )
        if record.recorded_after_runs:
            notes.append(
                f"{grid}: the end point was recorded after {record.recorded_after_runs} of its "
                "runs had finished, not in advance."
            )
    unrecorded = [g for g, r in records.items() if r is None]
    if unrecorded:
        where = ", ".join(str(g) for g in unrecorded)
        notes.append(
            f"The end point was not recorded in advance for {where} (no {PROTOCOL_FILE}): "
            f"this report's choice ({describe(protocol)}) was made after its results."
        )
    return Resolved(protocol, warnings, notes)
