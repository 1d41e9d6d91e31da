"""`hfedmoe report`: the results table computed by hand from run files, the plots, and an HTML
page that a headless browser renders."""

from __future__ import annotations

import html
import json
import shutil
import subprocess

import numpy as np
import pytest
import tomli_w

from hfedmoe.experiment.paired import ToTarget
from hfedmoe.experiment.report import (
    Run,
    coefficient_of_variation,
    compare_with,
    find_runs,
    label_runs,
    paired_table,
    plot_all,
    privacy_table,
    seeds_warning,
    setting_sentence,
    summarise,
    write_report,
)

from .support.cli import invoke_cli, run_cli
from .support.configs import tiny_raw


def _protocol_warnings(md: str) -> list[str]:
    """The report's warnings but the one about too few seeds (these tests' grids are small)."""
    return [
        line
        for line in md.splitlines()
        if line.startswith("**Warning") and "seeds per method" not in line
    ]


def _fake_run(path, algorithm, seed, accuracies, failed=(), flops=1e9, personal=None):
    """A finished run directory with hand-made metrics: 2 clients a round, 1 step each;
    ``personal``: (mean, worst) per-client accuracy of every round."""
    path.mkdir(parents=True)
    rounds = []
    for k, acc in enumerate(accuracies):
        clients = []
        if k:
            for node in (1, 2):
                bad = (k, node) in failed
                clients.append(
                    {
                        "status": "failed" if bad else "ok",
                        "failure": "budget" if bad else "",
                        "partition_id": node - 1,
                        "steps": 0 if bad else 1,
                        "step_flops_predicted": None if bad else flops,
                        "expert_updates": None if bad else [node, 1, 0, 2],
                    }
                )
        ok = sum(c["status"] == "ok" for c in clients)
        rounds.append(
            {
                "round": k,
                "failures": {"budget": len(clients) - ok} if len(clients) > ok else {},
                "test_accuracy": acc,
                "clients_ok": ok,
                "clients_failed": len(clients) - ok,
                "bytes_down": 100 * k,
                "bytes_up": 10 * k,
                "clients": clients,
            }
        )
        if personal is not None:
            rounds[-1]["personal_accuracy_mean"], rounds[-1]["personal_accuracy_worst"] = personal[
                k
            ]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds))
    (path / "summary.json").write_text(json.dumps({"algorithm": algorithm, "seed": seed}))
    return path


def test_the_table_by_hand(tmp_path):
    a0 = _fake_run(tmp_path / "a0", "a", 0, [0.2, 0.5, 0.8, 0.9])
    a1 = _fake_run(tmp_path / "a1", "a", 1, [0.2, 0.7, 0.7, 0.7], failed={(1, 2)})
    b0 = _fake_run(tmp_path / "b0", "b", 0, [0.2, 0.9, 0.9, 0.9])
    rows = {r.algorithm: r for r in summarise([Run.load(p) for p in (a0, a1, b0)], target=0.8)}
    a, b = rows["a"], rows["b"]
    assert a.final_mean == pytest.approx(0.8) and a.final_std == pytest.approx(
        np.std([0.9, 0.7], ddof=1)
    )
    # only seed 0 reaches 0.8, at round 2: half the seeds, so the median is its round
    assert a.rounds_to_target == ToTarget(2.0, 1, 2)
    assert a.compute_to_target.median == pytest.approx(4e9)  # 2 rounds x 2 clients x 1e9
    assert b.rounds_to_target == ToTarget(1.0, 1, 1)
    assert b.compute_to_target.median == pytest.approx(2e9)
    assert a.failure_rate == pytest.approx((0 + 1 / 6) / 2)  # seed 1 lost 1 of 6 trainings
    assert a.bytes_per_round == pytest.approx(220.0)  # rounds 1-3: 110, 220, 330
    assert (a.failures, b.failures) == ({"budget": 1}, {})
    assert a.personal_mean is None  # recorded before per-client evaluation: shown as "-"
    # per-expert updates over seed 0: 3 rounds x ([1,1,0,2] + [2,1,0,2]) = [9, 6, 0, 12]
    assert Run.load(a0).expert_updates().tolist() == [9, 6, 0, 12]
    assert coefficient_of_variation(np.array([9, 6, 0, 12])) == pytest.approx(
        np.std([9, 6, 0, 12]) / 6.75
    )


def test_a_run_that_updates_no_expert_has_no_utilisation_balance(tmp_path):
    run = _fake_run(tmp_path / "frozen", "frozen-experts", 0, [0.2, 0.5])
    metrics = run / "metrics.jsonl"
    text = metrics.read_text().replace("[1, 1, 0, 2]", "[0, 0, 0, 0]")
    metrics.write_text(text.replace("[2, 1, 0, 2]", "[0, 0, 0, 0]"))
    assert Run.load(run).expert_updates() is None
    (row,) = summarise([Run.load(run)], target=0.9)
    assert row.utilisation_cv is None  # shown as "-", not nan


def test_the_privacy_table_shows_the_largest_epsilon_any_seed_spent(tmp_path):
    runs = []
    for seed, spent in ((0, 2.5), (1, 2.75)):
        path = _fake_run(tmp_path / f"private{seed}", "fedavg", seed, [0.2, 0.5])
        lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        lines[-1].update(dp_epsilon=spent, dp_delta=1e-5, dp_noise_multiplier=1.5)
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        runs.append(Run.load(path))
    runs.append(Run.load(_fake_run(tmp_path / "plain", "random", 0, [0.2, 0.5])))
    header, cells = privacy_table(runs)
    assert header == ["method", "epsilon", "delta", "noise multiplier"]
    assert cells == [["fedavg", "2.75", "1.0e-05", "1.5"]]  # no row for the plain run


def test_client_memory_and_compute_count_what_clients_measured_and_ran_besides_training(tmp_path):
    run = _fake_run(tmp_path / "a0", "a", 0, [0.2, 0.9])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    measured = zip((100, 300), (50, 10), (0.5e9, None), lines[1]["clients"], strict=True)
    for held, peak, extra, c in measured:
        c.update(memory_held_bytes=held, memory_measured_bytes=peak, extra_flops_predicted=extra)
    lines[1]["clients"][1]["overlapped_flops_predicted"] = 0.25e9  # FLUX's stale profiling
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    (row,) = summarise([Run.load(run)], target=0.9)
    assert row.client_memory == 310  # the larger client: 300 held + 10 while training
    # 2 clients x 1 step x 1e9, + 0.5e9 besides training, + 0.25e9 overlapping aggregation
    assert row.compute_to_target.median == pytest.approx(2.75e9)


def test_per_client_accuracy_is_the_last_rounds_mean_and_worst_averaged_over_seeds(tmp_path):
    runs = [
        _fake_run(tmp_path / "s0", "a", 0, [0.2, 0.6], personal=[(0.2, 0.1), (0.5, 0.3)]),
        _fake_run(tmp_path / "s1", "a", 1, [0.2, 0.8], personal=[(0.2, 0.1), (0.7, 0.1)]),
    ]
    (row,) = summarise([Run.load(p) for p in runs], target=0.9)
    assert row.personal_mean == pytest.approx(0.6) and row.personal_worst == pytest.approx(0.2)
    assert row.personal_spread is None  # no per-client list recorded: mean and worst only


def test_the_per_client_spread_is_the_std_over_clients_averaged_over_seeds(tmp_path):
    paths = [_fake_run(tmp_path / f"s{s}", "a", s, [0.2, 0.6], personal=[(0.2, 0.1)] * 2)
             for s in (0, 1)]  # fmt: skip
    for path, accuracies in zip(paths, ([0.5, 0.7], [0.2, 0.6, 0.4]), strict=True):
        rounds = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        rounds[-1]["personal_accuracy"] = accuracies  # std 0.1, then sqrt(0.08 / 3)
        (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds))
    (row,) = summarise([Run.load(p) for p in paths], target=0.9)
    assert row.personal_spread == pytest.approx((0.1 + (0.08 / 3) ** 0.5) / 2)


def test_the_same_method_from_two_grids_makes_two_rows(tmp_path):
    for grid, acc in (("clean", 0.9), ("faulty", 0.7)):
        for seed in (0, 1):
            _fake_run(tmp_path / grid / "a" / f"seed{seed}", "a", seed, [0.2, acc])
    runs = label_runs([Run.load(p) for p in find_runs([tmp_path / "clean", tmp_path / "faulty"])])
    rows = {r.algorithm: r for r in summarise(runs, target=0.8)}
    assert sorted(rows) == ["clean/a", "faulty/a"]
    assert rows["clean/a"].seeds == [0, 1] and rows["faulty/a"].final_mean == pytest.approx(0.7)
    # grids of the same name in different places are told apart by their whole path
    _fake_run(tmp_path / "other" / "clean" / "a" / "seed0", "a", 0, [0.2, 0.5])
    found = find_runs([tmp_path / "clean", tmp_path / "other", tmp_path / "clean" / "a"])
    assert len(found) == 3  # clean/a/seed0 named twice counts once
    labels = {r.label for r in label_runs([Run.load(p) for p in found])}
    assert labels == {f"{tmp_path / 'clean'}/a", f"{tmp_path / 'other' / 'clean'}/a"}


def test_grid_directories_are_searched_and_incomplete_runs_skipped(tmp_path):
    _fake_run(tmp_path / "g" / "a" / "seed0", "a", 0, [0.1, 0.2])
    (tmp_path / "g" / "a" / "seed1.incomplete-1").mkdir(parents=True)
    (tmp_path / "g" / "a" / "seed1.incomplete-1" / "summary.json").write_text("{}")
    assert find_runs([tmp_path / "g"]) == [tmp_path / "g" / "a" / "seed0"]


@pytest.fixture(scope="module")
def real_grid(tiny_bert_dir, tmp_path_factory):
    """fedavg and hfedmoe, two seeds, on the tiny model with one device tier too small for
    FedAvg: a real grid to report on."""
    tmp = tmp_path_factory.mktemp("grid")
    raw = tiny_raw(tiny_bert_dir, federation={"rounds": 2})
    raw["report"] = {"target": 0.25}  # declared before the runs; compare records it
    from .support.tiers import three_tiers

    raw["devices"] = three_tiers(tiny_bert_dir, "hfedmoe")["devices"]
    raw["devices"]["assignment"] = ["small", "large"]
    config = tmp / "tiny.toml"
    config.write_text(tomli_w.dumps(raw))
    proc = run_cli(
        "compare", str(config), "--methods", "fedavg,hfedmoe", "--seeds", "0,1",
        "-o", str(tmp / "grid"), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return tmp / "grid"


def test_report_of_a_real_grid(real_grid, tmp_path):
    out = tmp_path / "report"
    proc = invoke_cli("report", str(real_grid), "-o", str(out), "--target", "0.25")
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert "Primary end point: final accuracy" in md and "Target accuracy: 0.25." in md
    assert ", 2 rounds, " in md.split("Primary end point")[0]  # the setting, read from config
    assert "not recorded in advance" not in md and not _protocol_warnings(md)  # compare did
    results, rest = md.split("## Paired by seed")
    paired, rest = rest.split("## Per seed")
    per_seed, rest = rest.split("## Client memory per device tier")
    memory, reasons = rest.split("## Failed client trainings by reason")
    rows = [
        line
        for line in results.splitlines()
        if line.startswith("| fedavg") or line.startswith("| hfedmoe")
    ]
    assert len(rows) == 2
    fedavg = rows[0].split(" | ")
    assert fedavg[1] == "0,1" and fedavg[8] == "0.500"  # the small device fails every round
    assert fedavg[7].endswith(" MiB")  # the largest client's memory, measured
    # against HFedMoE, seed by seed: both seeds paired, the mean alone, no verdict from two
    (against,) = [line.split(" | ") for line in paired.splitlines() if line.startswith("| fedavg")]
    assert against[1] == "0,1" and "[" not in against[2] and against[5] == "n/a"
    assert against[4] == "-"  # two seeds: not in Holm's family
    assert "| final accuracy (primary) |" in results and "(secondary)" in results
    (seeds,) = [line.split(" | ") for line in per_seed.splitlines() if line.startswith("| fedavg")]
    # seed by seed, final (last rounds' mean): the two finals average to the table's mean
    finals = [float(cell.split(" (")[0]) for cell in seeds[1:]]
    assert np.mean(finals) == pytest.approx(float(fedavg[2].split(" ± ")[0]), abs=1e-4)
    # memory per tier (the two assigned tiers): fedavg's small device never trained
    header = next(line for line in memory.splitlines() if line.startswith("| method"))
    assert header.split(" | ")[1:] == ["large", "small |"]
    fedavg_memory = next(line for line in memory.splitlines() if line.startswith("| fedavg"))
    assert fedavg_memory.split(" | ")[1].endswith(" MiB") and fedavg_memory.endswith("| - |")
    mean, worst, spread = (float(x) for x in fedavg[3].split(" / "))  # per-client accuracy
    assert 0 <= worst <= mean <= 1 and 0 <= spread <= 0.5
    # 2 seeds x 2 rounds, each with the small device sampled: 4 failures, all over budget
    assert "| fedavg | 4 |" in reasons and "| hfedmoe | 0 |" in reasons
    assert "| method | budget |" in reasons
    for name in ("accuracy", "personal", "compute", "failures", "bytes", "selection"):
        assert (out / f"{name}.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and 'id="results"' in page


def test_report_errors_are_one_line(tmp_path):
    proc = invoke_cli("report", str(tmp_path), "-o", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("hfedmoe: error: ")
    assert "no finished run" in proc.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_html_renders_in_headless_chromium(real_grid, tmp_path):
    out = tmp_path / "report"
    assert invoke_cli("report", str(real_grid), "-o", str(out)).returncode == 0
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
         (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="results"' in dom.stdout and dom.stdout.count("<img") == 6
    for table in ("Paired by seed", "Per seed", "Why, measured", "Client memory per device tier"):
        assert f"<h2>{table}</h2>" in dom.stdout  # the verdict's tables, as the browser built them


def test_device_time_and_memory_per_tier_by_hand(tmp_path):
    from hfedmoe.experiment.report import memory_tier_table

    def run(name, seed, accuracy, mib):
        path = tmp_path / name / f"seed{seed}"
        path.mkdir(parents=True)
        clients = [
            {"status": "ok", "tier": tier, "steps": 2, "step_flops_predicted": 1e9,
             "memory_held_bytes": held * 2**20, "memory_measured_bytes": 100 * 2**20}
            for tier, held in (("phone", mib), ("laptop", 2 * mib))
        ]  # fmt: skip
        counts = {"clients_ok": 2, "clients_failed": 0, "bytes_down": 1, "bytes_up": 1}
        rounds = [
            {"round": 0, "test_accuracy": 0.1, "clients": [], **counts},
            {"round": 1, "test_accuracy": accuracy, "clients": clients, **counts},
        ]
        (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds))
        (path / "summary.json").write_text(json.dumps({"algorithm": name, "seed": seed}))
        tiers = [{"name": "phone", "memory": "1GiB", "flops": 1e9},
                 {"name": "laptop", "memory": "4GiB", "flops": 4e9}]  # fmt: skip
        (path / "config.toml").write_text(tomli_w.dumps({"devices": {"tiers": tiers}}))
        return Run.load(path)

    runs = [run("hfedmoe", 0, 0.9, 200), run("hfedmoe", 1, 0.8, 300), run("fedavg", 0, 0.7, 400)]
    row = summarise(runs, 0.75)[0]
    # round 1: the phone needs 2 x 1e9 / 1e9 = 2 s, the laptop 2 x 1e9 / 4e9 = 0.5 s -> 2 s;
    # seed 1 (0.8) reaches 0.75 too
    assert row.device_seconds_to_target == ToTarget(2.0, 2, 2)
    np.testing.assert_allclose(runs[0].device_seconds(), [0.0, 2.0])  # the device-time plot's x
    assert "device_time" in plot_all(runs, 0.75)
    header, cells = memory_tier_table(runs)
    assert header == ["method", "laptop", "phone"]
    # hfedmoe: laptop (400 + 100, 600 + 100) -> 600 MiB; phone (300, 400) -> 350 MiB
    assert cells == [["hfedmoe", "600 MiB", "350 MiB"], ["fedavg", "900 MiB", "500 MiB"]]
    header, cells = paired_table(compare_with(runs, "final", "hfedmoe"), "final", "hfedmoe")
    # one seed in common: no p, no verdict, no spread to size a detectable difference; the
    # last rounds' mean (secondary) is round 1's alone (round 0 never counts)
    assert cells == [["fedavg", "0", "-0.2000", "-", "-", "n/a", "-", "-0.2000", "-"]]


def test_the_why_table_averages_what_hfedmoe_recorded(tmp_path):
    from hfedmoe.experiment.report import why_table

    def run(name, seed, overlaps, excluded):
        path = tmp_path / name / f"seed{seed}"
        path.mkdir(parents=True)
        clients = [{"status": "ok", "active_usage_overlap": o} for o in overlaps]
        rounds = [
            {"round": 0, "test_accuracy": 0.1, "clients": []},
            {"round": 1, "test_accuracy": 0.5, "clients": clients,
             "eq17_excluded_share": excluded},
        ]  # fmt: skip
        (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds))
        (path / "summary.json").write_text(json.dumps({"algorithm": name, "seed": seed}))
        return Run.load(path)

    runs = [
        run("hfedmoe", 0, [1.0, 0.5], 0.2),
        run("hfedmoe", 1, [0.0, None], 0.4),
        run("fedavg", 0, [None], None),
    ]
    header, rows = why_table(runs)
    assert header[0] == "method" and len(header) == 6
    assert rows == [["hfedmoe", "0.500", "0.300", "-", "-", "-"]]  # no row for fedavg

    # `hfedmoe analyze RUN` measured the selections: a row for every analysed method
    for r, (selected, random) in zip(runs, [(3.0, 1.0), (1.0, 1.0), (0.5, 1.0)], strict=True):
        (r.path / "analysis").mkdir()
        body = {"rise_selected": selected, "rise_random": random}
        (r.path / "analysis" / "selection.json").write_text(json.dumps(body))
    header, rows = why_table(runs)
    assert rows == [
        # (3 + 1) / (1 + 1), and the runs' own ratios 3 / 1 and 1 / 1
        ["hfedmoe", "0.500", "0.300", "-", "-", "2.00 (2 runs; per run 1.00 to 3.00)"],
        ["fedavg", "-", "-", "-", "-", "0.50 (1 run)"],
    ]


def test_a_run_whose_random_removal_lowered_the_loss_has_no_ratio_of_its_own():
    from hfedmoe.experiment.report import selection_cell

    assert selection_cell([]) == "-"
    assert selection_cell([(1.0, -0.5)]) == "-"  # pooled random rise below 0
    # pooled (2 + 1 + 3) / (1 - 0.5 + 1.5) = 3.00; the second run has no ratio of its own
    cell = selection_cell([(2.0, 1.0), (1.0, -0.5), (3.0, 1.5)])
    assert cell == "3.00 (3 runs; per run 2.00 to 2.00; 1 undefined)"


def test_every_column_of_the_table_has_a_header(tmp_path):
    from hfedmoe.experiment.report import COLUMNS, _cells

    (row,) = summarise([Run.load(_fake_run(tmp_path / "a", "a", 0, [0.2, 0.9]))], target=0.5)
    assert len(_cells(row)) == len(COLUMNS)
    assert COLUMNS[5:7] == ["client compute to target", "time to target on the devices"]


def test_every_end_point_a_config_may_name_primary_is_one_the_report_computes():
    from typing import get_args

    from hfedmoe.experiment.report import END_POINTS
    from hfedmoe.foundation.config import PrimaryEndPoint

    assert tuple(END_POINTS) == get_args(PrimaryEndPoint)


def test_the_paired_last_rounds_mean_by_hand(tmp_path):
    def run(name, seed, accuracies):
        return Run.load(_fake_run(tmp_path / name / f"s{seed}", name, seed, accuracies))

    runs = [
        run("hfedmoe", 0, [0.1, 0.5, 0.6, 0.7, 0.8]),  # last 3: 0.7
        run("hfedmoe", 1, [0.1, 0.5, 0.6, 0.6, 0.6]),  # 0.6
        run("random", 0, [0.1, 0.9, 0.6, 0.6, 0.6]),  # 0.6: -0.1
        run("random", 1, [0.1, 0.9, 0.5, 0.5, 0.5]),  # 0.5: -0.1
    ]
    header, cells = paired_table(
        compare_with(runs, "last-rounds", "hfedmoe"), "last-rounds", "hfedmoe"
    )
    assert header[2].startswith("primary: last 3 rounds' mean accuracy - hfedmoe")
    # differences -0.1 and -0.1: two seeds, so the mean alone, which decides nothing
    assert cells[0][2] == "-0.1000" and cells[0][5] == "n/a"
    assert header[7].startswith("secondary: final accuracy - hfedmoe")
    assert cells[0][7].startswith("-0.1500")  # final: -0.2 and -0.1


def test_the_per_seed_table_by_hand(tmp_path):
    from hfedmoe.experiment.report import per_seed_table

    def run(name, seed, accuracies):
        return Run.load(_fake_run(tmp_path / name / f"s{seed}", name, seed, accuracies))

    runs = [
        run("hfedmoe", 0, [0.1, 0.5, 0.6, 0.7, 0.8]),  # last 3 rounds: 0.6, 0.7, 0.8
        run("hfedmoe", 1, [0.1, 0.5, 0.6, 0.6, 0.6]),
        run("random", 1, [0.1, 0.9, 0.5, 0.5, 0.2]),  # no seed 0
    ]
    header, cells = per_seed_table(runs)
    assert header == [
        "method",
        "seed 0: final (last 3 rounds' mean)",
        "seed 1: final (last 3 rounds' mean)",
    ]
    assert cells == [
        ["hfedmoe", "0.8000 (0.7000)", "0.6000 (0.6000)"],
        ["random", "-", "0.2000 (0.4000)"],
    ]


def _timed_run(path, seed, accuracies, failed=None, round_timeout=None):
    """A run of method "a" on one device tier ("phone", 1 GFLOP/s) whose trained client needs
    2 s a round (2 steps x 1 GFLOP); ``failed``: round -> the failure of a second client."""
    path.mkdir(parents=True)
    rounds = []
    for k, acc in enumerate(accuracies):
        clients = []
        if k:
            clients.append({"status": "ok", "tier": "phone", "steps": 2,
                            "step_flops_predicted": 1e9})  # fmt: skip
            if k in (failed or {}):
                clients.append({"status": "failed", "failure": failed[k], "tier": "phone"})
        counts = {"clients_ok": 1, "clients_failed": len(clients) - 1 if k else 0}
        rounds.append({"round": k, "test_accuracy": acc, "clients": clients,
                       "bytes_down": 1, "bytes_up": 1, **counts})  # fmt: skip
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds))
    (path / "summary.json").write_text(json.dumps({"algorithm": "a", "seed": seed}))
    federation = {} if round_timeout is None else {"round_timeout": round_timeout}
    tiers = [{"name": "phone", "memory": "1GiB", "flops": 1e9}]
    (path / "config.toml").write_text(
        tomli_w.dumps({"devices": {"tiers": tiers}, "federation": federation})
    )
    return Run.load(path)


def test_time_to_target_counts_every_seed_and_a_failed_clients_time(tmp_path):
    from hfedmoe.experiment.report import _cells

    def seeds(timeout):
        where = tmp_path / f"timeout-{timeout}"
        return [
            # reaches 0.8 at round 2: 2 + 2 s; the client refused over budget spends nothing
            _timed_run(where / "s0", 0, [0.1, 0.5, 0.9, 0.9], {1: "budget"}, timeout),
            # reaches it at round 1, where a client raised: the server waited the timeout for it
            _timed_run(where / "s1", 1, [0.1, 0.9, 0.9, 0.9], {1: "error"}, timeout),
            _timed_run(where / "s2", 2, [0.1, 0.5, 0.5, 0.5], None, timeout),  # never reaches it
        ]

    (row,) = summarise(seeds(30.0), 0.8)
    # the median of (4 s, 30 s, never): the 2nd smallest, 30 s; averaging the seeds that
    # reached it, and counting the failed client as nothing, would say (4 + 2) / 2 = 3 s
    assert row.device_seconds_to_target == ToTarget(30.0, 2, 3)
    assert row.rounds_to_target == ToTarget(2.0, 2, 3)  # rounds 2, 1 and never
    cells = _cells(row)
    assert cells[4:7] == ["2 (2 of 3)", "0.0 TFLOP (2 of 3)", "30 s (2 of 3)"]
    # without a round timeout, what the client that raised spent is not recorded: no time,
    # rather than one that leaves it out
    (row,) = summarise(seeds(None), 0.8)
    assert row.device_seconds_to_target is None and _cells(row)[6] == "-"
    # fewer than half reach a target: not reached, whatever the one that did took
    runs = [Run.load(tmp_path / "timeout-30.0" / f"s{s}") for s in (0, 1, 2)]
    (row,) = summarise(runs[1:], 0.8)  # 1 of 2 reaches it: half, so its time is the median
    assert _cells(row)[6] == "30 s (1 of 2)"
    (row,) = summarise([runs[2], runs[1], runs[2]], 0.8)  # 1 of 3: fewer than half
    assert _cells(row)[6] == "not reached (1 of 3)"


def test_the_verdicts_are_corrected_over_the_settings_comparisons(tmp_path):
    from hfedmoe.experiment.paired import holm

    finals = {
        "hfedmoe": [0.40, 0.50, 0.60],
        "b": [0.70, 0.78, 0.92],  # +0.30, +0.28, +0.32: p 0.0015
        "c": [0.50, 0.56, 0.72],  # +0.10, +0.06, +0.12: p 0.034, below 0.05 alone
        "d": [0.30, 0.52, 0.50],  # -0.10, +0.02, -0.10: p 0.27
    }
    runs = [
        Run.load(_fake_run(tmp_path / m / f"seed{s}", m, s, [0.1, acc]))
        for m, accs in finals.items()
        for s, acc in enumerate(accs)
    ]
    comparisons = compare_with(runs, "final", "hfedmoe")
    raw = [c.differences["final"].p for c in comparisons]
    assert raw == pytest.approx([0.00148, 0.03391, 0.27239], abs=1e-5)
    # Holm: 0.00148 x 3, 0.03391 x 2, max(0.0678, 0.27239 x 1)
    assert [c.p_adjusted for c in comparisons] == pytest.approx(holm(raw))
    assert holm(raw) == pytest.approx([0.00443, 0.06782, 0.27239], abs=1e-5)
    header, cells = paired_table(comparisons, "final", "hfedmoe")
    assert header[3:6] == ["p (paired t)", "p, Holm-adjusted over 3 tested comparisons", "verdict"]
    assert [row[3:6] for row in cells] == [
        ["0.001", "0.004", "ahead"],
        ["0.034", "0.068", "tied"],  # its interval holds no 0, but three were compared
        ["0.272", "0.272", "tied"],
    ]
    assert header[7:] == [
        "secondary: last 3 rounds' mean accuracy - hfedmoe (95% CI)",
        "secondary: per-client mean accuracy - hfedmoe (95% CI)",
    ]


def _grid(tmp_path, record: dict | None):
    """A grid of two methods x two seeds, finished, with ``record`` as its [report] section
    recorded before the runs (None: a grid from before records)."""
    from hfedmoe.experiment import protocol
    from hfedmoe.foundation.config import ReportConfig

    grid = tmp_path / "grid"
    if record is not None:
        protocol.fix(grid, ReportConfig(**record))
    for method, acc in (("hfedmoe", 0.8), ("fedavg", 0.6)):
        for seed in (0, 1):
            _fake_run(grid / method / f"seed{seed}", method, seed, [0.2, acc + seed / 10])
    return grid


def test_a_recorded_end_point_cannot_change_after_the_results_unless_asked(tmp_path):
    grid, out = _grid(tmp_path, {"target": 0.8}), tmp_path / "out"
    assert invoke_cli("report", str(grid), "-o", str(out)).returncode == 0
    md = (out / "report.md").read_text()
    assert "Target accuracy: 0.8." in md and not _protocol_warnings(md)
    assert invoke_cli("report", str(grid), "-o", str(out), "--target", "0.8").returncode == 0

    for option in (["--target", "0.7"], ["--primary", "last-rounds"]):
        proc = invoke_cli("report", str(grid), "-o", str(tmp_path / "refused"), *option)
        assert proc.returncode == 2 and not (tmp_path / "refused").exists()
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(
            f"hfedmoe: error: {grid}: the grid's end point was recorded before its results "
            "(primary 'final', target 0.8, reference 'hfedmoe'); "
        )
        assert line.endswith(
            "is asked for after 4 of its runs finished (keep --primary and --target as "
            "recorded, or pass --change-end-point, which the report will state)"
        )

    proc = invoke_cli("report", str(grid), "-o", str(out), "--target", "0.7",
                      "--primary", "last-rounds", "--change-end-point")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    warning = (
        f"The end point was changed after the results (--change-end-point): {grid} recorded "
        "primary 'final', target 0.8, reference 'hfedmoe' before its results; this report uses "
        "primary 'last-rounds', target 0.7, reference 'hfedmoe'."
    )
    md = (out / "report.md").read_text()
    assert md.split("\n")[2] == f"**Warning: {warning}**"  # under the title
    assert "Primary end point: last 3 rounds' mean accuracy" in md
    page = (out / "report.html").read_text()
    assert f'<p class="warning"><strong>Warning: {html.escape(warning)}' in page

    # a change made by `compare --change-end-point` is stated the same way
    from hfedmoe.experiment import protocol
    from hfedmoe.foundation.config import ReportConfig

    protocol.fix(grid, ReportConfig(target=0.6), change=True)
    assert invoke_cli("report", str(grid), "-o", str(out)).returncode == 0
    assert (out / "report.md").read_text().split("\n")[2] == (
        "**Warning: The end point was changed after the results (--change-end-point): "
        f"{grid} recorded primary 'final', target 0.8, reference 'hfedmoe', replaced by "
        "primary 'final', target 0.6, reference 'hfedmoe' after 4 of its runs had finished.**"
    )

    proc = invoke_cli("report", str(grid), "-o", str(out), "--primary", "best")
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(
        "--primary: unknown 'best' (expected one of: final, last-rounds, per-client)"
    )


def test_a_grid_without_a_record_gets_the_defaults_and_says_so(tmp_path):
    grid, out = _grid(tmp_path, None), tmp_path / "out"
    proc = invoke_cli("report", str(grid / "hfedmoe"), str(grid / "fedavg"), "-o", str(out),
                      "--target", "0.65")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert f"The end point was not recorded in advance for {grid} (no protocol.json)" in md
    assert "Primary end point: final accuracy" in md and "Target accuracy: 0.65." in md
    assert not _protocol_warnings(md)
    # no target at all: the costs to the target stay empty, and the report says none was set
    assert invoke_cli("report", str(grid), "-o", str(out)).returncode == 0
    md = (out / "report.md").read_text()
    assert "Target accuracy: none declared." in md
    assert "| hfedmoe | 0,1 | 0.8500 ± 0.0707 | - | - | - | - |" in md


def test_two_seeds_give_a_mean_no_interval_and_a_warning_first(tmp_path):
    """With fewer than 3 paired seeds the report shows the mean difference alone (a 2-seed
    t-interval is 12.7 standard errors wide), tests nothing, and says so before anything."""
    finals = {"hfedmoe": [0.40, 0.50], "fedavg": [0.70, 0.60]}  # +0.30, +0.10
    runs = [
        Run.load(_fake_run(tmp_path / m / f"seed{s}", m, s, [0.1, acc]))
        for m, accs in finals.items()
        for s, acc in enumerate(accs)
    ]
    header, cells = paired_table(compare_with(runs, "final", "hfedmoe"), "final", "hfedmoe")
    assert header[4] == "p, Holm-adjusted (no comparison tested)"
    assert cells[0][:7] == ["fedavg", "0,1", "+0.2000", "-", "-", "n/a", "-"]
    assert seeds_warning(runs).startswith("2 seeds per method: the differences below describe")
    assert seeds_warning([*runs, *runs[:1]]) is not None
    write_report([r.path for r in runs], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.split("\n")[2].startswith("**Warning: 2 seeds per method")  # the only warning


def test_the_report_says_what_was_run_from_the_runs_own_configs(tmp_path):
    """Its first line names the config, rounds, clients and steps, and any data cap (a quick
    profile's subset); a key that differs between runs lists each value."""
    quick = (
        ("name", "hfedmoe"),
        ("federation.rounds", 3),
        ("federation.clients_per_round", 4),
        ("federation.num_clients", 8),
        ("train.local_steps", 3),
        ("data.max_train_examples", 400),
        ("data.max_test_examples", None),
    )
    runs = [Run(tmp_path, "fedavg", 0, [], setting=quick), Run(tmp_path, "hfedmoe", 0, [])]
    assert setting_sentence(runs) == (
        "Setting: config 'hfedmoe', 3 rounds, 4 of 8 clients a round, 3 local steps a client; "
        "data capped: training at most 400 examples (each run's config.toml holds the rest)."
    )
    longer = tuple((k, 5 if k == "federation.rounds" else v) for k, v in quick)
    runs.append(Run(tmp_path, "random", 0, [], setting=longer))
    assert ", 3 or 5 rounds, " in setting_sentence(runs)
    assert setting_sentence([Run(tmp_path, "fedavg", 0, [])]) is None  # no config.toml
