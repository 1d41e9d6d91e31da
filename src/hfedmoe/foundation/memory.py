"""What a process frees goes back to the operating system (glibc's heap).

glibc keeps the memory a process frees for reuse, and raises its mmap threshold each time a
large block is freed, so that later tensors come from the heap too. A client's training and
the server's evaluation free hundreds of MB of tensors in sizes that do not recur, and that
memory stays resident, fragmented: the default job peaked at 2.67 GB with 1.91 GB of state,
and at 2.19 GB with the setting below (docs/BENCHMARKS.md, "Peak RSS"). A user should not have
to know ``MALLOC_TRIM_THRESHOLD_``, so the apps set the same thing themselves where the config
says so (``trim_memory``, on by default): a trim threshold of 0 returns the top of the heap
whenever it is free, and fixes the mmap threshold at its default (128 KiB), so large tensors
are mapped and unmapped whole. That costs time (the kernel maps and zeroes pages afresh): 1.13
times a round of the default job on a CPU. Calling ``malloc_trim(0)`` between a client's
training and the server's evaluation instead, which keeps glibc's own thresholds, took the
default job's peak only from 2.67 to 2.62 GB: the peak is reached inside a client's training.

Written here because neither torch nor Python exposes it; ``mallopt`` is glibc's (and musl
accepts and ignores it); elsewhere (macOS, Windows) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools

#: glibc's mallopt parameter (malloc.h)
M_TRIM_THRESHOLD = -1


@functools.cache
def return_freed_memory() -> bool:
    """Tell this process's allocator to give freed memory back (once per process); whether
    it accepted."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_TRIM_THRESHOLD, 0) == 1
