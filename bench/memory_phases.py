"""Where a run's memory peaks: ``hfedmoe ARGS`` in this process, its resident set sampled every
50 ms together with the main thread's innermost hfedmoe functions.

    .venv/bin/python -m bench.memory_phases run configs/chat_sft.toml --no-progress -o /tmp/m

Prints the peak and the function it was reached in, the highest resident set seen in each
phase (the innermost three hfedmoe frames) and a timeline every two seconds. A sampler, not the
kernel's high-water mark: a peak shorter than 50 ms can be missed (``/usr/bin/time -v`` gives
the exact maximum; this says where it is). Linux only. Written by hand because memory profilers
trace Python's allocations, and a run's memory is torch's and glibc's.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def hfedmoe_stack(thread_id: int) -> tuple[str, ...]:
    """The thread's hfedmoe frames, outermost first, as ``module.function``."""
    frame = sys._current_frames().get(thread_id)
    stack = []
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if "hfedmoe" in path.parts:
            stack.append(f"{path.stem}.{frame.f_code.co_name}")
        frame = frame.f_back
    return tuple(reversed(stack))


def main() -> None:
    samples: list[tuple[float, int, tuple[str, ...]]] = []
    main_id, done = threading.main_thread().ident, threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            samples.append((time.monotonic(), resident_bytes(), hfedmoe_stack(main_id)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from hfedmoe.cli import main as hfedmoe

    sys.argv = ["hfedmoe", *sys.argv[1:]]
    try:
        hfedmoe()
    except SystemExit as exit_:
        if exit_.code:
            raise
    finally:
        done.set()
        sampler.join()
    if not samples:
        return
    _, peak, where = max(samples, key=lambda s: s[1])
    where_text = " > ".join(where[-6:]) or "(no hfedmoe frame)"
    print(f"\npeak resident set {peak / 1e9:.2f} GB in {where_text}")
    by_phase: dict[str, int] = collections.defaultdict(int)
    for _, rss, stack in samples:
        phase = " > ".join(stack[-3:]) or "(no hfedmoe frame)"
        by_phase[phase] = max(by_phase[phase], rss)
    print("\nhighest resident set per phase")
    for phase, rss in sorted(by_phase.items(), key=lambda kv: -kv[1])[:20]:
        print(f"{rss / 1e9:6.2f} GB  {phase}")
    print("\ntimeline")
    start, last = samples[0][0], -2.0
    for t, rss, stack in samples:
        if t - start - last >= 2.0:
            last = t - start
            print(f"{last:7.1f} s {rss / 1e9:6.2f} GB  {' > '.join(stack[-2:])}")


if __name__ == "__main__":
    main()
