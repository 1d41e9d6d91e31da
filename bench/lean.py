"""The lean core: peak memory against the clients per round, and the engine's share
of a round, on the default job.

    .venv/bin/python -m bench.lean                       # configs/default.toml
    .venv/bin/python -m bench.lean --rounds 10 --time-only    # the time split alone
    .venv/bin/python -m bench.lean --time-only --workers 2    # 1 worker x 2 threads, 2 x 1

Memory: one ``hfedmoe run`` per setting, one round each, one after another; the peak resident
set size of each whole process (``os.wait4``'s ``ru_maxrss``): K clients per round of 8 for
every K of ``--per-round``, and 10 per round of 200 clients.

Time: one run of ``--rounds`` rounds (and one with ``--workers`` worker processes, the cores
split between them); per round, from metrics.jsonl, the round's wall time split
into the clients' local training (``seconds``), eq. (16)'s extra pass (``usage_seconds``), the
central evaluation (``eval_seconds``), the algorithm's aggregation (``aggregate_seconds``), and
the rest: the engine (packing, unpacking, loading weights into the resident model, the reply's
copy, validation, checkpoints and results files). Run it on an idle machine: the shares are
ratios within one run, but another process on the cores moves them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hfedmoe.results import read_metrics


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in GB, wall seconds) of ``cmd``, a child process of its own."""
    import time

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024 / 1e9, seconds  # ru_maxrss is in KiB on Linux


def shares(run_dir: Path) -> dict[str, float]:
    """The mean seconds per round of each part of a round (rounds 1..R)."""
    rounds = read_metrics(run_dir)[1:]
    parts = {"training": 0.0, "usage pass": 0.0, "evaluation": 0.0, "aggregation": 0.0}
    total = 0.0
    for r in rounds:
        ok = [c for c in r["clients"] if c["status"] == "ok"]
        parts["training"] += sum(c["seconds"] or 0.0 for c in ok)
        parts["usage pass"] += sum(c.get("usage_seconds") or 0.0 for c in ok)
        parts["evaluation"] += r.get("eval_seconds", 0.0)
        parts["aggregation"] += r.get("aggregate_seconds", 0.0)
        total += r["round_seconds"]
    parts["engine"] = total - sum(parts.values())
    return {k: v / len(rounds) for k, v in {**parts, "round": total}.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/default.toml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", default="2,4,8", help="clients per round, of 8")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--time-only", action="store_true", help="skip the memory runs")
    parser.add_argument(
        "--workers", type=int, default=1, help="also time N worker processes (cores / N threads)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-lean-"))
    hfedmoe = [sys.executable, "-m", "hfedmoe", "run", args.config, "--no-progress"]
    sets = [a for o in args.overrides for a in ("--set", o)]

    settings = [(8, int(k)) for k in args.per_round.split(",")] + [(200, 10)]
    settings = [] if args.time_only else settings
    memory = {}
    for clients, per_round in settings:
        fed = [f"federation.num_clients={clients}", f"federation.clients_per_round={per_round}"]
        fed += ["federation.rounds=1"] + (["data.min_partition_size=1"] if clients > 8 else [])
        cmd = [*hfedmoe, *sets, *[a for o in fed for a in ("--set", o)]]
        memory[f"{per_round} of {clients}"] = peak_rss(
            [*cmd, "-o", str(work / f"mem-{clients}-{per_round}")]
        )
    if memory:
        print("| clients per round | peak RSS | wall s |")
        print("| --- | ---: | ---: |")
    for name, (gb, seconds) in memory.items():
        print(f"| {name} | {gb:.2f} GB | {seconds:.0f} |")

    cores = os.cpu_count() or 1
    splits = {}
    for workers in sorted({1, args.workers}):
        threads = max(1, cores // workers)
        run_dir = work / f"time-{workers}"
        options = [f"federation.rounds={args.rounds}", f"federation.workers={workers}"]
        options.append(f"threads={threads}")
        peak_rss([*hfedmoe, *sets, *[a for o in options for a in ("--set", o)], "-o", str(run_dir)])
        splits[f"{workers} worker(s) x {threads} thread(s)"] = shares(run_dir)
    first, *others = splits
    print(f"\nmean seconds per round, {args.rounds} rounds, {first}")
    print("| part | s / round | share |")
    print("| --- | ---: | ---: |")
    for part, seconds in splits[first].items():
        print(f"| {part} | {seconds:.2f} | {seconds / splits[first]['round']:.1%} |")
    for name in others:  # clients overlap: only the round's wall time compares
        ratio = splits[name]["round"] / splits[first]["round"]
        print(f"{name}: {splits[name]['round']:.2f} s / round ({ratio:.2f}x)")
    print(json.dumps({"memory": memory, "time": splits, "work": str(work)}))


if __name__ == "__main__":
    main()
