"""The tables of docs/RESULTS.md's "Hostile clients" from the runs of experiments/attacks.sh.

For each setting and number of attackers: every attack's final test accuracy minus that of the
same seed's run in which the attackers took no part (same defences), mean over the seeds with a
95% t-interval, defences off and on; what the server did with the attackers' replies (failures
by reason, clipped groups, capped shares), and whether the pre-registered target holds (a mean
of at least -0.02 with the defences on, 1 attacker of 8).

    .venv/bin/python experiments/attacks_table.py runs/attacks
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

from hfedmoe.experiment.paired import paired_difference
from hfedmoe.results import read_metrics

#: "none": the would-be attackers honest, for comparison with what each attack does
KINDS = ["none", "inflate-examples", "sign-flip", "scale-update", "noise", "inflate-stats"]
KINDS += ["inf-metric"]
TARGET = -0.02


def final_accuracy(cell: Path) -> dict[int, float]:
    """seed -> final test accuracy of every finished run under ``cell`` (METHOD/seedK)."""
    out = {}
    for summary in sorted(cell.glob("*/seed*/summary.json")):
        seed = int(summary.parent.name.removeprefix("seed"))
        out[seed] = json.loads(summary.read_text())["final_test_accuracy"]
    return out


def handled(cell: Path) -> str:
    """What the server did with the attackers' replies, summed over the cell's finished runs."""
    failures: Counter = Counter()
    clipped = capped = 0
    summaries = sorted(cell.glob("*/seed*/summary.json"))
    if not summaries:
        return "-"
    for summary in summaries:
        for record in read_metrics(summary.parent)[1:]:
            failures.update(record.get("failures", {}))
            clipped += record.get("clipped", 0)
            capped += record.get("share_capped", 0)
    parts = [f"{reason} {n}" for reason, n in sorted(failures.items())]
    parts += [f"clipped {clipped}"] if clipped else []
    parts += [f"shares capped {capped}"] if capped else []
    return ", ".join(parts) or "all accepted"


def _attackers(run: Path) -> set[int]:
    """The partitions that attack in ``run`` (its config's ``faults.attackers``)."""
    return set(tomllib.loads((run / "config.toml").read_text())["faults"]["attackers"])


def cosines(cell: Path) -> str:
    """The descent check's cosines over a cell's finished runs: the attackers' replies and the
    honest ones (range and count), and how many honest replies it rejected."""
    attacker, honest, rejected = [], [], 0
    for summary in sorted(cell.glob("*/seed*/summary.json")):
        run = summary.parent
        attackers = _attackers(run)
        for record in read_metrics(run)[1:]:
            for c in record.get("clients", []):
                if c.get("descent_cosine") is None:
                    continue
                if c["partition_id"] in attackers:
                    attacker.append(c["descent_cosine"])
                else:
                    honest.append(c["descent_cosine"])
                    rejected += c["failure"] == "descent"

    def span(values: list[float]) -> str:
        return f"{min(values):+.3f} to {max(values):+.3f} ({len(values)})" if values else "none"

    return f"attackers {span(attacker)}, honest {span(honest)}, honest rejected {rejected}"


def _cell(diff) -> str:
    if not diff.seeds:
        return "-"
    if diff.low != diff.low:  # one seed: no interval
        return f"{diff.mean:+.3f} (1 seed)"
    return f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] ({len(diff.seeds)})"


#: defences beyond the defaults, each a column where its runs exist: cell suffix -> title, and
#: the absent run its cost to honest clients is measured against (without it, same data)
EXTRA = {
    "median": ("on, with the median", "on", "The median against the weighted mean"),
    "descent": (
        "on, with the descent check",
        "validated",
        "The descent check against none (both with the validation split)",
    ),
}


def table(root: Path, setting: str, n: str) -> list[str]:
    base = root / setting / n
    absent = {d: final_accuracy(base / f"dropout-{d}") for d in ("on", "off")}
    extra = {d: final_accuracy(base / f"dropout-{d}") for d in EXTRA}
    extra = {d: runs for d, runs in extra.items() if runs}
    if not any(absent.values()) and not extra:
        return []
    lines = [
        f"### {setting}, {n.replace('of', ' of ')} attacking",
        "",
        "| attack | defences off | defences on | what the server did (on) |"
        + "".join(f" {EXTRA[d][0]} | what the server did |" for d in extra),
        "| --- | --- | --- | --- |" + " --- | --- |" * len(extra),
    ]
    both = sorted(set(absent["on"]) & set(absent["off"]))  # seeds finished with both
    same = all(absent["on"][k] == absent["off"][k] for k in both)
    mean_absent = sum(absent["on"].values()) / max(len(absent["on"]), 1)
    misses = {d: [] for d in ("on", *extra)}
    for kind in KINDS:
        diffs = {
            d: paired_difference(final_accuracy(base / f"{kind}-{d}"), {**absent, **extra}[d])
            for d in ("on", "off", *extra)
        }
        lines.append(
            f"| {kind} | {_cell(diffs['off'])} | {_cell(diffs['on'])} | "
            f"{handled(base / f'{kind}-on')} |"
            + "".join(f" {_cell(diffs[d])} | {handled(base / f'{kind}-{d}')} |" for d in extra)
        )
        for d in misses:
            if kind != "none" and diffs[d].seeds and diffs[d].mean < TARGET:
                misses[d].append(kind)
    lines.append("")
    if absent["on"]:
        lines.append(
            f"Absent attackers: final accuracy {mean_absent:.3f} (mean over seeds "
            f"{sorted(absent['on'])}); the absent runs with the defences on and off are "
            f"{'identical' if same else 'NOT identical'} (seeds {both})."
        )
    if "descent" in extra:
        for kind in ("dropout", "sign-flip"):
            lines.append(f"Descent cosines, {kind}: {cosines(base / f'{kind}-descent')}.")
    for d, runs in extra.items():
        baseline = final_accuracy(base / f"dropout-{EXTRA[d][1]}")
        cost = paired_difference(runs, baseline)
        lines.append(f"{EXTRA[d][2]}, attackers absent: {_cell(cost)}.")
    if n == "1of8":
        for d, missed in misses.items():
            if d == "on" and not absent["on"]:
                continue
            verdict = "misses it: " + ", ".join(missed) if missed else "holds for every attack run"
            name = "defences on" if d == "on" else EXTRA[d][0]
            lines.append(f"Target (mean >= {TARGET}, {name}): {verdict}.")
    return [*lines, ""]


def attacker_share(run: Path) -> tuple[float, int]:
    """The attackers' mean share of the examples of the rounds they took part in, and in how
    many rounds they did (by the sizes the server knows: FedAvg's weights)."""
    attackers = _attackers(run)
    shares = []
    for record in read_metrics(run)[1:]:
        replies = [c for c in record.get("clients", []) if c["status"] == "ok"]
        total = sum(c["num_examples"] or 0 for c in replies)
        theirs = sum(c["num_examples"] or 0 for c in replies if c["partition_id"] in attackers)
        if theirs and total:
            shares.append(theirs / total)
    return (sum(shares) / len(shares) if shares else 0.0), len(shares)


def shares_table(root: Path, setting: str, kind: str = "sign-flip") -> list[str]:
    """Seed by seed, what one attack cost with the defences on against the attackers' share of
    the rounds they joined (their data share: FedAvg's weight, which no defence cuts)."""
    base = root / setting / "1of8"
    absent = final_accuracy(base / "dropout-on")
    attacked = final_accuracy(base / f"{kind}-on")
    seeds = sorted(set(absent) & set(attacked))
    if not seeds:
        return []
    lines = [
        f"### {setting}, 1 of 8: {kind} by seed (defences on)",
        "",
        "| seed | rounds joined | attacker's share of their examples | attacked - absent |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for seed in seeds:
        share, rounds = attacker_share(next((base / f"{kind}-on").glob(f"*/seed{seed}")))
        lines.append(f"| {seed} | {rounds} | {share:.2f} | {attacked[seed] - absent[seed]:+.3f} |")
    return [*lines, ""]


def main(root: Path) -> None:
    for setting in ("default", "d"):
        for n in ("1of8", "2of8"):
            print("\n".join(table(root, setting, n)))
        print("\n".join(shares_table(root, setting)))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/attacks"))
