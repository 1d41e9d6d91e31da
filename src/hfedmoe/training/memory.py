"""Measured cost of a block of work: peak memory above the level at entry.

On a CUDA device, torch's allocator statistics (``max_memory_allocated``). On the CPU, written
by hand because torch keeps no statistics of CPU allocations. Linux only: the kernel's
high-water mark of resident memory (VmHWM) is reset through /proc/self/clear_refs, and glibc is
asked to give freed memory back first (``malloc_trim``) so that memory freed before the block
is not reused unseen. Elsewhere the measurement is None.

The budget cost model (``hfedmoe.budget``) predicts what this measures; the calibration harness
that compares the two lives with the tests (``tests/support/calibration.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim() -> None:
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL(name).malloc_trim(0)


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.increase``: peak bytes above the entry
    level, of the CUDA device's allocations or of the process's RSS on the CPU (None where the
    platform cannot tell)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.start: int | None = None
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        _trim()
        try:
            _CLEAR_REFS.write_text("5")  # reset the high-water mark to the current RSS
        except OSError:
            return self
        rss = _status_kib("VmRSS")
        self.start = None if rss is None else rss * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.start is not None:
            hwm = _status_kib("VmHWM")
            self.peak = None if hwm is None else hwm * 1024

    @property
    def increase(self) -> int | None:
        if self.start is None or self.peak is None:
            return None
        return max(self.peak - self.start, 0)
