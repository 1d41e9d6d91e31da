"""Forward passes that ask for no vocabulary-wide logits (``hfedmoe.model.experts.lean_forward``):
the multiple-choice evaluation and eq. (16)'s usage pass, with every position's logits and with
the lean options, on a decoder setting's model and test questions.

    .venv/bin/python -m bench.lean_passes configs/qa_domains.toml --questions 64

Each mode runs in a process of its own (one thread): the resident memory a pass adds at its
peak (the process's resident set sampled every 5 ms during the pass, less what it held before)
and the pass's wall time. The results must be equal bit for bit; the script fails otherwise.
Time is a ratio within one run; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def resident_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_added(run):
    """(run's result, the most resident MiB it added at any sampled moment)."""
    base, peak, done = resident_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], resident_mib() - base)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return run(), peak[0]
    finally:
        done.set()
        sampler.join()


def measure(config: str, mode: str, questions: int, batch_size: int) -> dict:
    """One mode, in this process: the (pass -> seconds, peak MiB added, result) of each pass."""
    import numpy as np
    import torch

    from hfedmoe.algorithms.mechanics import hooks
    from hfedmoe.federation.workload import server_workload
    from hfedmoe.foundation.config import load
    from hfedmoe.training import evaluation

    torch.set_num_threads(1)
    if mode == "full":  # every position's logits, as before lean_forward
        evaluation.lean_forward = hooks.lean_forward = lambda *args, **kwargs: {}
    workload = server_workload(load(config))
    test = workload.test.subset(np.arange(min(questions, len(workload.test))))
    out = {}
    for name, run in {
        "evaluation": lambda: evaluation.evaluate_choices(workload.model, test, batch_size),
        "usage pass": lambda: hooks.usage_over_data(workload.model, test, batch_size),
    }.items():
        start = time.perf_counter()
        result, added = peak_added(run)
        seconds = time.perf_counter() - start
        value = result.loss_N.tolist() if name == "evaluation" else result.flatten().tolist()
        out[name] = {"seconds": seconds, "peak_mib_added": added, "value": value}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mode", choices=["full", "lean"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # a child: one mode
        print(json.dumps(measure(args.config, args.mode, args.questions, args.batch_size)))
        return
    results = {}
    for mode in ("full", "lean"):
        cmd = [sys.executable, "-m", "bench.lean_passes", args.config, "--mode", mode]
        cmd += ["--questions", str(args.questions), "--batch-size", str(args.batch_size)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{args.questions} questions, batch {args.batch_size}, one thread")
    print("| pass | full s | lean s | ratio | full peak + MiB | lean peak + MiB | equal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in results["full"]:
        full, lean = results["full"][name], results["lean"][name]
        equal = full["value"] == lean["value"]
        print(
            f"| {name} | {full['seconds']:.1f} | {lean['seconds']:.1f} | "
            f"{lean['seconds'] / full['seconds']:.2f} | {full['peak_mib_added']:.0f} | "
            f"{lean['peak_mib_added']:.0f} | {'bit for bit' if equal else 'NO'} |"
        )
        if not equal:
            sys.exit(f"{name}: the lean pass differs from the full one")


if __name__ == "__main__":
    main()
