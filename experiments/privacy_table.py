"""The noise client-level DP needs, from the accountant alone (docs/PRIVACY.md):

    .venv/bin/python experiments/privacy_table.py [--rounds 10]
    .venv/bin/python experiments/privacy_table.py --runs runs/privacy   # accuracy against epsilon


For each federation (N clients, k sampled a round) and each target epsilon at delta =
min(1e-5, N^-1.1): the noise multiplier z that the planned rounds need (dp-accounting's RDP
accountant, fixed-size sampling, replace-one), and the length of the noise on the round's mean
update in units of the clipping norm C: 2z/k per coordinate, times sqrt(D) over D trained
parameters (default: the default job's 47,537,285). The mean of the clipped updates is at most
C long, so a noise many times C long drowns a round's signal; only many rounds, many clients
or few trained parameters (adapters) bring it back.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from hfedmoe.algorithms.maths.accounting import default_delta, noise_for_epsilon

#: (N clients, k sampled a round): the shipped settings', then the scale DP-FedAvg needs
FEDERATIONS = [(8, 4), (100, 10), (1_000, 100), (10_000, 1_000)]
EPSILONS = [8.0, 3.0, 1.0]


def accuracy_table(root: Path) -> None:
    """Final test accuracy against epsilon from experiments/privacy.sh's finished runs:
    ``root/<setting>/eps-<e>/<method>/seed<k>/summary.json``."""
    print("| setting | method | epsilon | seeds | final test accuracy | epsilon spent | z |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for setting in sorted(p for p in root.iterdir() if p.is_dir()):
        cells = sorted(setting.glob("eps-*"), key=lambda p: -float(p.name[4:]))
        for cell in cells:
            for method in sorted(p for p in cell.iterdir() if p.is_dir()):
                runs = [
                    json.loads(s.read_text()) for s in sorted(method.glob("seed*/summary.json"))
                ]
                if not runs:
                    continue
                acc = [r["final_test_accuracy"] for r in runs]
                spread = f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else ""
                spent = runs[0].get("dp_epsilon")
                z = runs[0].get("dp_noise_multiplier")
                print(
                    f"| {setting.name} | {method.name} | {cell.name[4:]} | {len(runs)} | "
                    f"{statistics.mean(acc):.3f}{spread} | "
                    f"{'-' if spent is None else f'{spent:.2f}'} | "
                    f"{'-' if z is None else f'{z:.2f}'} |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--parameters", type=int, default=47_537_285)
    parser.add_argument("--runs", type=Path, help="experiments/privacy.sh's output: accuracy")
    args = parser.parse_args()
    if args.runs is not None:
        accuracy_table(args.runs)
        return
    rounds, root = args.rounds, math.sqrt(args.parameters)
    print(f"{rounds} rounds, {args.parameters:,} parameters: z; the noise on the mean update, ")
    print("per coordinate and its length, in units of C\n")
    print("| clients | a round | delta | " + " | ".join(f"epsilon {e:g}" for e in EPSILONS) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in EPSILONS) + " |")
    for n, k in FEDERATIONS:
        delta = default_delta(n)  # rounds, n, k: what noise_for_epsilon calibrates
        cells = []
        for eps in EPSILONS:
            z = noise_for_epsilon(eps, rounds, n, k, delta)
            cells.append(f"z {z:.2f}: {2 * z / k:.3g} C, {2 * z / k * root:,.0f} C long")
        print(f"| {n:,} | {k:,} | {delta:.1e} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
