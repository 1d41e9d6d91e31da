"""Measured cost of a block of work: peak memory above the level at entry.

On a CUDA device, torch's allocator statistics (``max_memory_allocated``). On the CPU, written
by hand because torch keeps no statistics of CPU allocations. Linux only: the kernel's
high-water mark of resident memory (VmHWM) is reset through /proc/self/clear_refs, and glibc is
asked to give freed memory back first (``malloc_trim``) so that memory freed before the block
is not reused unseen. Elsewhere the measurement is None.

Step FLOPs are counted by torch's ``FlopCounterMode`` (every matmul the step really runs).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from hfedmoe.config import ExperimentConfig

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


def count_step_flops(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], active_LE: torch.Tensor
) -> float:
    """FLOPs torch counts for one forward + backward of ``batch`` training ``active_LE``."""
    from hfedmoe.model.experts import ExpertModel

    em = ExpertModel(model)
    model.train()
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        loss = model(**batch).loss
        with em.update_only(active_LE):
            loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure_client_memory(cfg: ExperimentConfig, experts: int, partition_id: int = 0) -> dict:
    """Train one client of ``cfg`` for ``cfg.train.local_steps`` steps with ``experts`` experts
    per batch (chosen at random among the routed ones) and compare the peak memory training
    adds with the cost model's prediction. Run it in a fresh process: earlier allocations in
    the same process blur the peak."""
    import numpy as np

    from hfedmoe.algorithms.importance import select_active
    from hfedmoe.budget import build_cost_model
    from hfedmoe.task import client_data, client_model, label_names
    from hfedmoe.training import StepHooks, train_local

    class RandomExperts(StepHooks):
        def __init__(self) -> None:
            self.gen = torch.Generator().manual_seed(cfg.seed)

        def select_experts(self, capture, batch, routed_LE):
            score = torch.rand(routed_LE.shape, generator=self.gen)
            return select_active(score, routed_LE, experts, "global")

    data = client_data(cfg, partition_id, cfg.federation.num_clients)
    model = client_model(cfg, label_names(cfg))
    costs = build_cost_model(model, cfg)
    result = train_local(model, data, cfg.train, np.random.default_rng(cfg.seed), RandomExperts())
    return {
        "experts": experts,
        "max_active_per_step": result.max_active_per_step,
        "predicted_bytes": costs.step_extra_bytes(experts),
        "measured_bytes": result.peak_memory_increase,
        "resident_bytes": costs.resident_bytes,
        "activation_bytes": costs.activation_bytes,
        "seconds_per_step": result.seconds / result.steps,
    }
