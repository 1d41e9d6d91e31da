"""`hfedmoe tune`: every method over the same grid on tuning seeds, each method's value picked
by its validation end point and never by its test one; `compare --tuned` runs each method with
its values, never on a tuning seed."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import tomli_w

from hfedmoe.experiment import tuning
from hfedmoe.experiment.comparison import Cell
from hfedmoe.foundation.errors import HFedMoEError

from .support.cli import invoke_cli
from .support.configs import tiny_raw

# --- the grid ---------------------------------------------------------------------------------


def test_a_grid_is_toml_lists():
    keys = tuning.parse_grid(["lr=[1e-5, 1e-4]", "hfedmoe.tau=0.05"])
    assert keys == [tuning.GridKey("lr", (1e-5, 1e-4)), tuning.GridKey("hfedmoe.tau", (0.05,))]
    for bad, message in [
        ("lr", "expected KEY=\\[VALUES\\]"),
        ("lr=[1e-5,", "not a TOML list"),
        ("lr=[]", "no values"),
    ]:
        with pytest.raises(HFedMoEError, match=message):
            tuning.parse_grid([bad])
    with pytest.raises(HFedMoEError, match="given twice"):
        tuning.parse_grid(["lr=[1]", "lr=[2]"])


def test_lr_is_each_methods_own_rate_and_a_section_key_only_its_methods():
    keys = tuning.parse_grid(["lr=[0.001, 0.01]", "hfedmoe.tau=[0.05]", "train.local_steps=[3]"])
    assert tuning.points("fedavg", keys) == [
        ("train.lr=0.001", "train.local_steps=3"),
        ("train.lr=0.01", "train.local_steps=3"),
    ]
    assert tuning.points("fftmoe", keys)[0] == ("fftmoe.lr=0.001", "train.local_steps=3")
    assert tuning.points("hfedmoe-holder-avg", keys)[1] == (
        "train.lr=0.01",
        "hfedmoe.tau=0.05",
        "train.local_steps=3",
    )


def test_every_method_gets_the_same_number_of_trials(tmp_path):
    keys = tuning.parse_grid(["lr=[1e-5, 1e-4]", "hfedmoe.tau=[0.03, 0.05]"])
    with pytest.raises(HFedMoEError, match="same number of trials \\(fedavg 2, hfedmoe 4\\)"):
        tuning.plan(tmp_path, ["fedavg", "hfedmoe"], keys, [100])
    cells = tuning.plan(tmp_path, ["fedavg", "random"], keys[:1], [100, 101])
    assert len(cells) == 8 and {c.run_dir.parent.name for c in cells} == {
        "train.lr=1e-05",
        "train.lr=0.0001",
    }


# --- the choice: by validation, never by test --------------------------------------------------


def _finished(run_dir: Path, validation: list[float], test: list[float]) -> None:
    run_dir.mkdir(parents=True)
    rounds = [{"round": 0, "test_accuracy": 0.2, "validation_accuracy": 0.2}]
    for r, (v, t) in enumerate(zip(validation, test, strict=True), start=1):
        rounds.append({"round": r, "test_accuracy": t, "validation_accuracy": v})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rounds))
    (run_dir / "summary.json").write_text("{}")


def test_the_choice_reads_validation_and_never_test(tmp_path):
    """Rate 1e-4 is better on validation (final 0.70 and 0.72: mean 0.71 against 0.65), 1e-5
    on test: the choice is 1e-4. With the last 3 rounds' mean, 1e-5 (0.66 against 0.6233)."""
    keys = tuning.parse_grid(["lr=[1e-5, 1e-4]"])
    cells = tuning.plan(tmp_path, ["fedavg"], keys, [100, 101])
    runs = {(c.sets, c.seed): c.run_dir for c in cells}
    slow, fast = ("train.lr=1e-05",), ("train.lr=0.0001",)
    _finished(runs[(slow, 100)], [0.66, 0.66, 0.65], [0.99, 0.99, 0.99])
    _finished(runs[(slow, 101)], [0.66, 0.66, 0.65], [0.99, 0.99, 0.99])
    _finished(runs[(fast, 100)], [0.50, 0.65, 0.70], [0.10, 0.10, 0.10])
    _finished(runs[(fast, 101)], [0.50, 0.65, 0.72], [0.10, 0.10, 0.10])
    choices, trials = tuning.choose(cells, "final")
    assert choices["fedavg"] == tuning.Choice("fedavg", fast, pytest.approx(0.71))
    assert len(trials) == 4 and {t["validation"] for t in trials} == {0.65, 0.70, 0.72}
    assert tuning.choose(cells, "last-rounds")[0]["fedavg"].sets == slow


def test_a_tie_goes_to_the_first_point_in_grid_order(tmp_path):
    cells = tuning.plan(tmp_path, ["fedavg"], tuning.parse_grid(["lr=[1e-5, 1e-4]"]), [100])
    for cell in cells:
        _finished(cell.run_dir, [0.5], [0.5])
    assert tuning.choose(cells, "final")[0]["fedavg"].sets == ("train.lr=1e-05",)


def test_a_choice_at_the_edge_of_its_grid_is_flagged(tmp_path):
    """Validation rises with the rate all the way to the grid's last value: chosen, and flagged
    as the highest tried (with 3 values or more; with 2 every choice is an edge, no flag)."""
    keys = tuning.parse_grid(["lr=[1e-5, 1e-4, 1e-3]"])
    cells = tuning.plan(tmp_path, ["fedavg"], keys, [100])
    for cell, accuracy in zip(cells, [0.5, 0.6, 0.7], strict=True):
        _finished(cell.run_dir, [accuracy], [accuracy])
    [choice] = tuning.choose(cells, "final")[0].values()
    assert choice.sets == ("train.lr=0.001",)
    assert choice.edge == ("train.lr=0.001 (highest tried)",)
    assert tuning.grid_edges([("a=1",), ("a=2",), ("a=3",)], ("a=2",)) == ()
    assert tuning.grid_edges([("a=1",), ("a=2",)], ("a=1",)) == ()
    points = [("a=1", "b=x"), ("a=1", "b=y"), ("a=2", "b=x"), ("a=2", "b=y"), ("a=3", "b=x")]
    assert tuning.grid_edges(points, ("a=1", "b=y")) == ("a=1 (lowest tried)",)


def test_an_edge_is_judged_by_value_whatever_order_the_grid_lists():
    """A grid written out of order: its first value is not its lowest. Numbers are ordered by
    value; non-numeric values keep the grid's order and are named first and last."""
    shuffled = [("lr=0.001",), ("lr=1e-05",), ("lr=0.0001",)]
    assert tuning.grid_edges(shuffled, ("lr=0.001",)) == ("lr=0.001 (highest tried)",)
    assert tuning.grid_edges(shuffled, ("lr=1e-05",)) == ("lr=1e-05 (lowest tried)",)
    assert tuning.grid_edges(shuffled, ("lr=0.0001",)) == ()
    words = [("mode=b",), ("mode=a",), ("mode=c",)]
    assert tuning.grid_edges(words, ("mode=b",)) == ("mode=b (first tried)",)
    assert tuning.grid_edges(words, ("mode=c",)) == ("mode=c (last tried)",)


def test_a_run_without_validation_metrics_cannot_be_tuned_on(tmp_path):
    [cell] = tuning.plan(tmp_path, ["fedavg"], tuning.parse_grid(["lr=[1e-5]"]), [100])
    cell.run_dir.mkdir(parents=True)
    (cell.run_dir / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    (cell.run_dir / "summary.json").write_text("{}")
    with pytest.raises(HFedMoEError, match="no validation metrics"):
        tuning.choose([cell], "final")


def test_compare_applies_tuned_values_and_refuses_tuning_seeds_and_hand_set_values(tmp_path):
    tuned = tuning.Tuned({"fedavg": ("train.lr=0.0001",)}, (100, 101))
    runs = [Cell("fedavg", 0, tmp_path / "fedavg" / "seed0")]
    [cell] = tuned.cells(runs, ["federation.rounds=2"])
    assert cell.overrides(["federation.rounds=2"]) == [
        "federation.rounds=2",
        "train.lr=0.0001",
        "algorithm=fedavg",
        "seed=0",
    ]
    with pytest.raises(HFedMoEError, match="--seeds: \\[100\\] tuned the values"):
        tuned.cells([Cell("fedavg", 100, tmp_path)], [])
    with pytest.raises(HFedMoEError, match=r"--set train\.lr: tuned by --tuned"):
        tuned.cells(runs, ["train.lr=0.1"])
    with pytest.raises(HFedMoEError, match="'random' was not tuned"):
        tuned.cells([Cell("random", 0, tmp_path)], [])


# --- for real ----------------------------------------------------------------------------------


def test_tune_then_compare_with_the_tuned_rates(tiny_bert_dir, tmp_path):
    """FFT-MoE, two rates, one tuning seed, on the tiny model: tuned.json names the adapters'
    own rate (``fftmoe.lr``), and compare --tuned runs with it."""
    config = tmp_path / "tiny.toml"
    raw = tiny_raw(tiny_bert_dir, federation={"rounds": 1})
    raw["data"]["validation_fraction"] = 0.2
    config.write_text(tomli_w.dumps(raw))
    out = tmp_path / "tune"
    args = ["--methods", "fftmoe", "--grid", "lr=[1e-3, 1e-2]", "--seeds", "100"]
    proc = invoke_cli("tune", str(config), *args, "-o", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "tuned.json").read_text())
    assert record["seeds"] == [100] and len(record["trials"]) == 2
    assert record["methods"]["fftmoe"]["sets"][0].startswith("fftmoe.lr=")
    assert (out / "tuning.md").read_text().count("| yes |") == 1

    grid = tmp_path / "grid"
    proc = invoke_cli(
        "compare", str(config), "--methods", "fftmoe", "--seeds", "0",
        "--tuned", str(out), "-o", str(grid), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [item] = record["methods"]["fftmoe"]["sets"]
    used = tomllib.loads((grid / "fftmoe" / "seed0" / "config.toml").read_text())
    assert used["fftmoe"]["lr"] == float(item.split("=")[1])
    refused = invoke_cli(
        "compare", str(config), "--methods", "fftmoe", "--seeds", "100",
        "--tuned", str(out), "-o", str(grid), "--no-progress",
    )  # fmt: skip
    assert refused.returncode == 2 and "tuned the values" in refused.stderr


def test_tune_needs_a_validation_split(tiny_bert_dir, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(tiny_raw(tiny_bert_dir)))
    proc = invoke_cli("tune", str(config), "--methods", "fedavg", "--grid", "lr=[1e-3]")
    assert proc.returncode == 2 and "data.validation_fraction is 0" in proc.stderr
