"""`hfedmoe compare`: every method x seed on identical partitions, budgets and initial weights;
finished runs are never repeated, interrupted ones resume from their checkpoint, anything else
unfinished is set aside, bad input fails first."""

from __future__ import annotations

import json

import pytest
import tomli_w

from hfedmoe.experiment import comparison, protocol
from hfedmoe.foundation import config as config_mod
from hfedmoe.foundation.config import ReportConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.results import read_metrics, run_state

from .support.cli import checkpoint_round, invoke_cli, kill_when
from .support.configs import tiny_raw


def _config(tmp_path, tiny_bert_dir):
    path = tmp_path / "tiny.toml"
    raw = tiny_raw(tiny_bert_dir, federation={"rounds": 1})
    raw["devices"] = {"tiers": [{"name": "any", "memory": "8GiB"}]}
    path.write_text(tomli_w.dumps(raw))
    return path


def test_grid_runs_every_cell_once_on_shared_seeds(tiny_bert_dir, tmp_path):
    config, out = _config(tmp_path, tiny_bert_dir), tmp_path / "grid"
    args = ["compare", str(config), "--methods", "fedavg,random", "--seeds", "0,1"]
    proc = invoke_cli(*args, "-o", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    cells = {(m, s): out / m / f"seed{s}" for m in ("fedavg", "random") for s in (0, 1)}
    for (method, seed), run_dir in cells.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["algorithm"], summary["seed"]) == (method, seed)
    for seed in (0, 1):  # the same seed: the same initial model, data and devices
        starts = [read_metrics(cells[(m, seed)])[0] for m in ("fedavg", "random")]
        assert starts[0]["test_loss"] == starts[1]["test_loss"]
        assert starts[0]["devices"] == starts[1]["devices"]

    # the experiment's [report] (the defaults here) was recorded before any run finished
    assert protocol.read(out) == protocol.Record(ReportConfig(), recorded_after_runs=0)

    stamps = {k: (d / "summary.json").stat().st_mtime_ns for k, d in cells.items()}
    again = invoke_cli(*args, "-o", str(out), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "4 already finished" in again.stderr
    assert stamps == {k: (d / "summary.json").stat().st_mtime_ns for k, d in cells.items()}


def test_an_unfinished_run_is_set_aside_and_redone(tiny_bert_dir, tmp_path):
    config, out = _config(tmp_path, tiny_bert_dir), tmp_path / "grid"
    broken = out / "fedavg" / "seed0"
    broken.mkdir(parents=True)
    (broken / "metrics.jsonl").write_text('{"round": 0}\n')
    proc = invoke_cli(
        "compare", str(config), "--methods", "fedavg", "-o", str(out), "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    assert (broken / "summary.json").is_file()
    kept = out / "fedavg" / "seed0.incomplete-1" / "metrics.jsonl"
    assert kept.read_text() == '{"round": 0}\n'


@pytest.mark.slow  # resuming is covered by test_resume.py's kills (CI time)
def test_an_interrupted_run_resumes_from_its_checkpoint(tiny_bert_dir, tmp_path, monkeypatch):
    config, out = _config(tmp_path, tiny_bert_dir), tmp_path / "grid"
    base = ["federation.rounds=3"]
    args = ["compare", str(config), "--methods", "fedavg", "--set", base[0], "-o", str(out)]
    cell, kept = _interrupted(config, out, base)
    before = (cell.run_dir / "metrics.jsonl").read_text().splitlines()[:kept]

    # Only a checkpoint written by this same code is resumed: other code need not continue
    # the run the way an uninterrupted one would.
    assert comparison.resumable(config, cell, base)
    monkeypatch.setattr(run_state, "code_digest", lambda: "0.0.0+other")
    assert not comparison.resumable(config, cell, base)
    monkeypatch.undo()

    proc = invoke_cli(*args, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "0 already finished, 1 to resume" in proc.stderr
    assert cell.done
    final = cell.summary()["final_test_accuracy"]  # a line per finished run, bar or no bar
    assert f"done fedavg seed 0: final test accuracy {final:.3f}, " in proc.stderr
    # Finished rounds are not redone (a rerun would write new timings), nothing is set aside,
    # and the finished run keeps no checkpoint.
    after = (cell.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(after) == 4 and after[:kept] == before
    assert not list(out.glob("fedavg/*.incomplete-*"))
    assert not (cell.run_dir / run_state.CHECKPOINT_FILE).exists()

    # An unfinished run without a checkpoint (here: its summary lost) starts over; so does an
    # interrupted one with --fresh. Both are kept aside.
    rounds = (cell.run_dir / "metrics.jsonl").read_text()
    (cell.run_dir / "summary.json").unlink()
    assert not comparison.resumable(config, cell, base)
    proc = invoke_cli(*args, "--no-progress")
    assert "0 already finished, 0 to resume" in proc.stderr and cell.done
    assert (out / "fedavg" / "seed0.incomplete-1" / "metrics.jsonl").read_text() == rounds

    other = tmp_path / "other"
    cell, _ = _interrupted(config, other, base)
    proc = invoke_cli(*args[:-1], str(other), "--fresh", "--no-progress")
    assert "0 already finished, 0 to resume" in proc.stderr and cell.done
    assert [p.name for p in other.glob("fedavg/seed0.incomplete-*")] == ["seed0.incomplete-1"]


def _interrupted(config, out, base: list[str]) -> tuple[comparison.Cell, int]:
    """fedavg's seed-0 cell of the grid in ``out``, started as compare starts it and killed
    once round 1's checkpoint is written; and how many rounds' records a resume keeps."""
    cell = comparison.Cell("fedavg", 0, out / "fedavg" / "seed0")
    sets = [arg for item in cell.overrides(base) for arg in ("--set", item)]
    kill_when(
        ["run", str(config), *sets, "-o", str(cell.run_dir), "--no-progress"],
        lambda: checkpoint_round(cell.run_dir) >= 1,
    )
    kept = checkpoint_round(cell.run_dir) + 1  # rounds 0..r; a later round's lines are redone
    assert 2 <= kept < 4 and not cell.done
    return cell, kept


@pytest.mark.slow  # setting aside is covered by test_an_unfinished_run_is_set_aside_and_redone
def test_an_unfinished_run_of_another_experiment_is_set_aside(tiny_bert_dir, tmp_path):
    config, out = _config(tmp_path, tiny_bert_dir), tmp_path / "grid"
    args = ["compare", str(config), "--methods", "fedavg"]
    proc = invoke_cli(*args, "--set", "train.lr=0.5", "-o", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    (out / "fedavg" / "seed0" / "summary.json").unlink()

    proc = invoke_cli(*args, "-o", str(out), "--no-progress")  # the default lr: another run
    assert proc.returncode == 0, proc.stderr
    assert "0 already finished, 0 to resume" in proc.stderr
    aside = out / "fedavg" / "seed0.incomplete-1" / "config.toml"
    assert "lr = 0.5" in aside.read_text()
    assert "lr = 0.5" not in (out / "fedavg" / "seed0" / "config.toml").read_text()


def test_bad_grid_input_fails_before_anything_runs(tiny_bert_dir, tmp_path):
    config, out = _config(tmp_path, tiny_bert_dir), tmp_path / "grid"
    for extra, message in (
        (["--methods", "fedavg,fedmagic"], "algorithm: unknown 'fedmagic'"),
        (["--methods", "fedavg", "--seeds", "0,x"], "--seeds: expected a comma-separated list"),
        (["--methods", "fedavg", "--profile", "huge"], "--profile: unknown 'huge'"),
    ):
        proc = invoke_cli("compare", str(config), *extra, "-o", str(out), "--no-progress")
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith(f"hfedmoe: error: {message}")
        assert not out.exists()


def test_a_cell_being_run_cannot_be_run_twice_but_another_cell_can(tiny_bert_dir, tmp_path):
    config, out = _config(tmp_path, tiny_bert_dir), tmp_path / "grid"
    with comparison.locked(out, comparison.plan(out, ["fedavg"], [0])):  # a first `compare`
        proc = invoke_cli("compare", str(config), "--methods", "random,fedavg", "-o", str(out))
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1] == (
            f"hfedmoe: error: -o {out}: another `hfedmoe compare` is running fedavg seed 0 of "
            "this grid (wait for it, or choose other methods, seeds or another directory)"
        )
        assert not (out / "fedavg").exists() and not (out / "random").exists()
        proc = invoke_cli(
            "compare", str(config), "--methods", "random", "-o", str(out), "--no-progress"
        )
        assert proc.returncode == 0, proc.stderr  # seed 0's other methods are free
        assert (out / "random" / "seed0" / "summary.json").is_file()
    proc = invoke_cli(
        "compare", str(config), "--methods", "fedavg", "-o", str(out), "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr  # the lock ends with its holder


def _finished(cell_dir, accuracy=0.5):
    """A cell that a `compare` finished (only what compare's table reads)."""
    cell_dir.mkdir(parents=True)
    summary = {"final_test_accuracy": accuracy, "best_test_accuracy": accuracy,
               "failure_rate": 0.0, "wall_seconds": 1.0}  # fmt: skip
    (cell_dir / "summary.json").write_text(json.dumps(summary))


def test_the_end_point_is_recorded_before_results_and_kept_after(tmp_path):
    grid = tmp_path / "grid"
    final, later = ReportConfig(target=0.9), ReportConfig(primary="last-rounds", target=0.9)
    assert protocol.fix(grid, final) == protocol.Record(final)  # recorded before any run
    assert protocol.read(grid) == protocol.Record(final)
    # no result yet: another choice replaces it, nothing was seen to choose by
    assert protocol.fix(grid, later) == protocol.Record(later)
    protocol.fix(grid, final)
    _finished(grid / "random" / "seed0.incomplete-1")  # set aside: not a result of the grid
    assert protocol.finished_runs(grid) == 0
    _finished(grid / "fedavg" / "seed0")
    assert protocol.finished_runs(grid) == 1
    assert protocol.fix(grid, final) == protocol.Record(final)  # the same choice goes on
    with pytest.raises(HFedMoEError) as refused:
        protocol.fix(grid, later)
    assert str(refused.value) == (
        f"{grid}: the grid's end point was recorded before its results (primary 'final', "
        "target 0.9, reference 'hfedmoe'); primary 'last-rounds', target 0.9, reference "
        "'hfedmoe' is asked for after 1 of its runs finished (keep [report] as recorded, or "
        "pass --change-end-point, which the report will state)"
    )
    assert protocol.read(grid) == protocol.Record(final)
    changed = protocol.fix(grid, later, change=True)  # asked for: kept, with what it replaced
    assert changed == protocol.Record(later, 0, (protocol.Replaced(final, 1),))
    assert protocol.read(grid) == changed


def test_a_grid_from_before_records_is_recorded_as_such(tmp_path):
    grid = tmp_path / "grid"
    for seed in (0, 1):
        _finished(grid / "fedavg" / f"seed{seed}")
    record = protocol.fix(grid, ReportConfig())
    assert record.recorded_after_runs == 2  # the report says: not in advance
    resolved = protocol.resolve({grid: record}, {})
    assert resolved.notes == [
        f"{grid}: the end point was recorded after 2 of its runs had finished, not in advance."
    ]
    with pytest.raises(HFedMoEError, match="was recorded after 2 of its runs had finished \\("):
        protocol.fix(grid, ReportConfig(target=0.5))


def test_the_report_section_does_not_make_a_checkpoint_another_experiments():
    a = config_mod.validate({"report": {"target": 0.9}})
    assert comparison.same_runs(a, config_mod.validate({"report": {"primary": "per-client"}}))
    assert not comparison.same_runs(a, config_mod.validate({"train": {"lr": 0.5}}))


def test_compare_refuses_another_end_point_once_a_run_finished(tiny_bert_dir, tmp_path):
    config, out = _config(tmp_path, tiny_bert_dir), tmp_path / "grid"
    protocol.fix(out, ReportConfig(target=0.9))
    _finished(out / "fedavg" / "seed0")
    args = ["compare", str(config), "--methods", "fedavg", "-o", str(out), "--no-progress"]
    proc = invoke_cli(*args)  # the config declares no target
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"hfedmoe: error: {out}: the grid's end point was recorded before ")
    assert "primary 'final', target none, reference 'hfedmoe' is asked for after 1" in line
    assert protocol.read(out).protocol.target == 0.9
    proc = invoke_cli(*args, "--change-end-point")  # nothing left to run: the cell is done
    assert proc.returncode == 0, proc.stderr
    record = protocol.read(out)
    assert record.protocol == ReportConfig() and record.replaced[0].after_runs == 1
