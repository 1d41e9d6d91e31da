"""A write that fails (a full disk, a read-only disk or folder, a permission) at any write of a
run: one line naming the file and the cause, exit status 2, nothing already written lost or
left half-written, and once the cause is gone the run resumes and ends as an uninterrupted run
would."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import tomli_w
from safetensors import SafetensorError

from hfedmoe.results import engine_independent, load_run_state
from hfedmoe.results.run_state import has_checkpoint

from .support.cli import invoke_cli, run_to_the_end
from .support.configs import tiny_raw
from .support.disk import fail_fsync

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
#: the same, as safetensors (Rust) raises it
FULL_SAFETENSORS = SafetensorError(
    "Error while serializing: I/O error: No space left on device (os error 28)"
)


@pytest.fixture(scope="module")
def config(tiny_bert_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("write-faults") / "tiny.toml"
    path.write_text(tomli_w.dumps(tiny_raw(tiny_bert_dir)))
    return path


@pytest.fixture(scope="module")
def whole(config, tmp_path_factory) -> Path:
    """The run no write of which failed."""
    return run_to_the_end(
        tmp_path_factory.mktemp("write-faults") / "whole", str(config), cli=invoke_cli
    )


def _run(config: Path, run_dir: Path):
    return invoke_cli("run", str(config), "-o", str(run_dir), "--no-progress")


def _assert_ends_as(whole: Path, run_dir: Path, *args: str) -> None:
    """Run again (``hfedmoe run ARGS``, else ``--resume``), the run ends as ``whole`` did."""
    run_to_the_end(run_dir, *args, cli=invoke_cli)
    assert engine_independent(run_dir) == engine_independent(whole)


def _assert_fails_with(proc, message: str) -> None:
    """Exit status 2 and one error line, the last (the run's progress may come before it)."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], proc.stderr
    assert lines[-1].startswith(f"hfedmoe: error: {message}"), lines[-1]


def _assert_nothing_lost(run_dir: Path, whole: Path) -> None:
    """What the run wrote before the failure is the uninterrupted run's beginning, its
    checkpoint loads, and no temporary file is left."""
    written = engine_independent(run_dir)
    assert written == engine_independent(whole)[: len(written)]
    assert not has_checkpoint(run_dir) or load_run_state(run_dir).round < len(written)
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("name", "nth", "code"),
    [
        ("metrics.jsonl", 1, errno.ENOSPC),  # round 0's record, before any checkpoint
        ("metrics.jsonl", 2, errno.ENOSPC),  # round 1's record
        ("clients.csv", 1, errno.ENOSPC),  # round 1's client rows
        ("checkpoint.safetensors", 2, errno.EROFS),  # round 1's, on a disk turned read-only
        ("summary.json", 1, errno.ENOSPC),  # the last write of a run
    ],
)
def test_a_failed_write_stops_the_run_with_one_line_and_it_resumes(
    name, nth, code, config, whole, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as disk:
        fail_fsync(disk, name, nth, code)
        proc = _run(config, run_dir)
    cause = os.strerror(code).lower()
    _assert_fails_with(proc, f"cannot write '{run_dir / name}': {cause}; once that is fixed, ")
    assert f"`hfedmoe run --resume {run_dir}` continues the run" in proc.stderr
    _assert_nothing_lost(run_dir, whole)
    _assert_ends_as(whole, run_dir)


@pytest.mark.parametrize(
    ("writer", "error", "name"),
    [
        ("hfedmoe.model.checkpoint.save_model", FULL_SAFETENSORS, "model"),
        ("matplotlib.figure.Figure.savefig", FULL, "accuracy.png"),
    ],
)
def test_a_full_disk_while_saving_the_model_or_the_plot(
    writer, error, name, config, whole, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"

    def full(*args, **kwargs):
        raise error

    with monkeypatch.context() as disk:
        disk.setattr(writer, full)
        proc = _run(config, run_dir)
    _assert_fails_with(proc, f"cannot write '{run_dir / name}': no space left on device; ")
    _assert_nothing_lost(run_dir, whole)
    _assert_ends_as(whole, run_dir)


def test_a_run_whose_first_write_fails_leaves_its_folder_empty_and_runs_again(
    config, whole, tmp_path, monkeypatch
):
    """Without its config.toml a folder holds no run to resume: the same command runs it."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as disk:
        fail_fsync(disk, "config.toml")
        proc = _run(config, run_dir)
    _assert_fails_with(proc, f"cannot write '{run_dir / 'config.toml'}': no space left on device")
    assert "--resume" not in proc.stderr
    assert list(run_dir.iterdir()) == []
    _assert_ends_as(whole, run_dir, str(config))


def test_an_output_folder_that_cannot_be_made_is_one_line(config, tmp_path):
    """A file where a folder should be (as root, the one failure a permission cannot give)."""
    (tmp_path / "file").write_text("not a folder")
    run_dir = tmp_path / "file" / "run"
    _assert_fails_with(_run(config, run_dir), f"cannot write '{run_dir}': not a directory")
    grid = tmp_path / "file" / "grid"
    proc = invoke_cli("compare", str(config), "--methods", "fedavg", "-o", str(grid))
    _assert_fails_with(proc, f"cannot write '{grid}': not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_output_folder_is_one_line_and_nothing_is_written(config, whole, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        proc = _run(config, folder / "run")
        _assert_fails_with(proc, f"cannot write '{folder / 'run'}': permission denied")
        proc = _run(config, folder)
        _assert_fails_with(proc, f"cannot write '{folder / 'config.toml'}': permission denied")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)
    _assert_ends_as(whole, folder, str(config))
