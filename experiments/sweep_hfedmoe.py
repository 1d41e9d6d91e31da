"""One-at-a-time sweep of HFedMoE's lambda, beta and tau (METHOD.md §7: not recovered from the
paper; pick defaults by a documented sweep). docs/SWEEP.md holds the table of one run.

    .venv/bin/python experiments/sweep_hfedmoe.py   # configs/hfedmoe.toml, 5 rounds, seed 0
    .venv/bin/python experiments/sweep_hfedmoe.py --rounds 10 --seeds 0 1 2

Each setting changes one value from the defaults and runs the real CLI; a run directory that
already has a summary.json is not run again, so an interrupted sweep resumes. Prints a Markdown
table of final and best test accuracy (mean over seeds) per setting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "defaults (lam 0.5, beta 0.1, tau 0.05)": [],
    "lam 0.25": ["hfedmoe.lam=0.25"],
    "lam 0.75": ["hfedmoe.lam=0.75"],
    "beta 0": ["hfedmoe.beta=0.0"],
    "beta 1": ["hfedmoe.beta=1.0"],
    "tau 0.1": ["hfedmoe.tau=0.1"],
    "tau 0.15": ["hfedmoe.tau=0.15"],  # above 1/E = 0.125: only above-average experts
}


def run(config: Path, out: Path, overrides: list[str]) -> dict:
    if not (out / "summary.json").is_file():
        cmd = [sys.executable, "-m", "hfedmoe", "run", str(config), "-o", str(out), "--no-progress"]
        for item in overrides:
            cmd += ["--set", item]
        if out.exists():  # an interrupted run: start it again
            for f in sorted(out.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
        subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "hfedmoe.toml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "sweep")
    args = parser.parse_args()
    rows = []
    for label, overrides in SETTINGS.items():
        finals, bests = [], []
        for seed in args.seeds:
            slug = "-".join(o.split(".", 1)[1].replace("=", "") for o in overrides) or "defaults"
            out = args.out / f"{slug}-r{args.rounds}-s{seed}"
            summary = run(
                args.config, out, [*overrides, f"federation.rounds={args.rounds}", f"seed={seed}"]
            )
            finals.append(summary["final_test_accuracy"])
            bests.append(summary["best_test_accuracy"])
        rows.append(f"| {label} | {np.mean(finals):.4f} | {np.mean(bests):.4f} |")
        print(rows[-1], flush=True)
    print(f"\n{args.rounds} rounds, seeds {args.seeds}\n")
    print("| setting | final accuracy | best accuracy |")
    print("|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
