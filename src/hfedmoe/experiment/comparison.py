"""A comparison grid: every method x seed of one experiment, each a normal run directory.

``hfedmoe compare CONFIG --methods fedavg,hfedmoe --seeds 0,1,2`` runs
``OUT/<method>/seed<k>/`` for each pair. Every run takes the same config with only ``algorithm``
and ``seed`` changed, so methods with the same seed share the split, the partition, the device
tiers and the initial weights (all derived from the seed). A run whose ``summary.json`` exists
is finished and is not repeated. An unfinished one continues from its last checkpoint
(``hfedmoe run --resume``, which ends exactly as an uninterrupted run would) when its
``config.toml`` is the experiment this cell asks for and the checkpoint was written by this
same code; otherwise, or with ``--fresh``, it is moved aside to ``<dir>.incomplete-<n>``
(never deleted) and started again. Each run is a child process (the real CLI), so one run's
memory is returned before the next starts and a crash stops only that run. One ``compare`` at a
time works on a cell (:func:`locked`): two would run the same unfinished cell into one directory;
two with no cell in common (other seeds, or other methods of a seed) may share a grid. The grid's
primary end point, target and reference are recorded before the first run
(:mod:`hfedmoe.experiment.protocol`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hfedmoe.foundation import config as config_mod
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.foundation.files import writing

#: Named reductions of an experiment, as --set overrides. "quick" is the smoke-test size.
PROFILES: dict[str, list[str]] = {
    "full": [],
    "quick": [
        "federation.rounds=3",
        "data.max_train_examples=400",
        "data.max_test_examples=200",
        "train.local_steps=3",
    ],
}


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``method`` with ``seed``, in ``run_dir``; ``sets``: its own
    ``--set`` items after the grid's (a tuning grid's point, a method's tuned values)."""

    method: str
    seed: int
    run_dir: Path
    sets: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        return (self.run_dir / "summary.json").is_file()

    def overrides(self, base: list[str]) -> list[str]:
        return [*base, *self.sets, f"algorithm={self.method}", f"seed={self.seed}"]

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())


def plan(out_dir: Path, methods: list[str], seeds: list[int]) -> list[Cell]:
    """The runs of the grid, seed-major so that early results cover every method."""
    return [Cell(m, s, out_dir / m / f"seed{s}") for s in seeds for m in methods]


@contextlib.contextmanager
def locked(out_dir: Path, runs: list[Cell]) -> Iterator[None]:
    """Hold the lock of each of ``runs`` (``OUT/.compare-<method>-seed<k>.lock``) for the block,
    or fail at once if another process holds one: two ``compare`` processes may share a grid
    directory when they share no cell (each cell is its own directory; the one file per grid,
    ``protocol.json``, is written whole, and only where it is missing, before any result, or
    with ``--change-end-point``), so a seed's methods can be split over two cores. The locks are the
    kernel's (flock): they end with the process, so a killed ``compare`` leaves nothing stale
    behind."""
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        for run in sorted(set(runs), key=lambda r: (r.seed, r.method, r.sets)):
            cell = run.run_dir.relative_to(out_dir).as_posix().replace("/", "-")
            path = out_dir / f".compare-{cell}.lock"
            with writing(path):
                handle = held.enter_context(open(path, "a"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                what = f"{run.method} seed {run.seed}" + "".join(f" {s}" for s in run.sets)
                raise HFedMoEError(
                    f"-o {out_dir}: another `hfedmoe compare` is running {what} of this grid "
                    "(wait for it, or choose other methods, seeds or another directory)"
                ) from None
        yield  # closing the files releases the locks


def validate_grid(config: Path, runs: list[Cell], base: list[str]) -> None:
    """Every run's config must validate (a bad method or key fails before anything runs)."""
    from hfedmoe.algorithms import build_algorithm

    for run in runs:
        build_algorithm(config_mod.load(config, run.overrides(base)))


def set_aside(run_dir: Path) -> Path | None:
    """Move an unfinished run directory out of the way (never delete results)."""
    if not run_dir.exists():
        return None
    n = 1
    while (target := run_dir.with_name(f"{run_dir.name}.incomplete-{n}")).exists():
        n += 1
    with writing(target):
        run_dir.rename(target)
    return target


def resumable(config: Path, run: Cell, base: list[str]) -> bool:
    """Whether an unfinished cell can continue: a checkpoint of the same experiment, written
    by the same code (only its header is read)."""
    from hfedmoe.results.run_state import code_digest, read_header

    saved = run.run_dir / "config.toml"
    if run.done or not saved.is_file():
        return False
    try:
        if not same_runs(config_mod.load(saved), config_mod.load(config, run.overrides(base))):
            return False
        return read_header(run.run_dir).get("code") == code_digest()
    except HFedMoEError:
        return False


def same_runs(a: config_mod.ExperimentConfig, b: config_mod.ExperimentConfig) -> bool:
    """Whether two configs run the same experiment: ``[report]`` only says how the results are
    read (:mod:`hfedmoe.experiment.protocol` guards its changes), so it does not make a
    checkpoint another experiment's."""
    return a.model_copy(update={"report": b.report}) == b


def execute(config: Path, run: Cell, base: list[str], resume: bool) -> subprocess.CompletedProcess:
    """Run one cell of the grid with the real CLI in a child process: continue it from its
    checkpoint (``resume``), or set aside what is there and start it. A grid folder it cannot
    write is a ``WriteError``."""
    cmd = [sys.executable, "-m", "hfedmoe", "run"]
    if resume:
        cmd += ["--resume", str(run.run_dir), "--no-progress"]
    else:
        set_aside(run.run_dir)
        with writing(run.run_dir.parent):
            run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd += [str(config), "--no-progress"]
        for item in run.overrides(base):
            cmd += ["--set", item]
        cmd += ["-o", str(run.run_dir)]
    return subprocess.run(cmd, capture_output=True, text=True)
