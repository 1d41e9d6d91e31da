"""Per-round overhead of Flower's engines against the embedded default, on the same job.

    .venv/bin/python -m bench.engines                    # configs/hfedmoe.toml, 3 rounds
    .venv/bin/python -m bench.engines --rounds 2 --set data.max_test_examples=100

Runs the job three times, one engine after another, on this machine:

* embedded: ``hfedmoe run`` (one process, clients called in turn);
* Ray simulation: ``hfedmoe flower`` on a managed local SuperLink, 1 CPU per client;
* deployment: a SuperLink and one SuperNode per client on 127.0.0.1 with TLS and SuperNode
  authentication (``tests.support.localnet``), ``hfedmoe flower --connection deploy``.

It prints the mean seconds per round (rounds 1..R, from metrics.jsonl), the wall time of the
whole command (start-up included), their ratios to the embedded engine, and whether the
per-round metrics are identical. docs/BENCHMARKS.md holds the table of one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hfedmoe.foundation.config import load
from hfedmoe.results import engine_independent, read_metrics
from tests.support.localnet import CONNECTION, LocalDeployment, flwr_env, free_port, stop_matching


def _timed(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/hfedmoe.toml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    overrides = [f"federation.rounds={args.rounds}", *args.overrides]
    cfg = load(args.config, overrides)
    sets = [a for o in overrides for a in ("--set", o)]
    hfedmoe = [sys.executable, "-m", "hfedmoe"]
    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    runs = {name: work / name for name in ("embedded", "ray", "deployment")}
    wall = {}
    wall["embedded"] = _timed(
        [*hfedmoe, "run", args.config, *sets, "-o", str(runs["embedded"]), "--no-progress"]
    )
    port = free_port()
    env = {
        **flwr_env(work / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    try:
        wall["ray"] = _timed([*hfedmoe, "flower", args.config, *sets, "-o", str(runs["ray"])], env)
    finally:
        stop_matching(f"--port {port}")
    tiers = [None] * cfg.federation.num_clients  # the config's own tier of each partition
    with LocalDeployment(work / "net", tiers) as net:
        cmd = [*hfedmoe, "flower", args.config, *sets, "-o", str(runs["deployment"])]
        wall["deployment"] = _timed([*cmd, "--connection", CONNECTION], net.env)
    reference = engine_independent(runs["embedded"])
    per_round = {
        name: sum(r["round_seconds"] for r in read_metrics(d)[1:]) / args.rounds
        for name, d in runs.items()
    }
    fed = cfg.federation
    print(f"{cfg.name} ({cfg.algorithm}): {args.rounds} rounds, {fed.clients_per_round} of "
          f"{fed.num_clients} clients per round")  # fmt: skip
    print("| engine | s / round | vs embedded | wall s | vs embedded | same metrics |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, run_dir in runs.items():
        same = "yes" if engine_independent(run_dir) == reference else "no"
        print(
            f"| {name} | {per_round[name]:.1f} | {per_round[name] / per_round['embedded']:.2f}x "
            f"| {wall[name]:.0f} | {wall[name] / wall['embedded']:.2f}x | {same} |"
        )
    print(json.dumps({"per_round": per_round, "wall": wall, "work": str(work)}))


if __name__ == "__main__":
    main()
