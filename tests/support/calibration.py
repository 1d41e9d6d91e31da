"""The budget cost model against what a real step costs: counted FLOPs and measured peak memory.

Test and benchmark harness (``tests/test_budget.py``, ``bench/budget.py``), not part of the
package: it trains real clients and so needs every layer of hfedmoe. Step FLOPs are counted by
torch's ``FlopCounterMode`` (every matmul the step really runs); memory by
:class:`hfedmoe.training.PeakMemory`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from hfedmoe.algorithms.maths.importance import select_active
from hfedmoe.budget import build_cost_model
from hfedmoe.federation.workload import client_data, client_model, label_names
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.model.experts import ExpertModel
from hfedmoe.training import StepHooks, train_local


def count_step_flops(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], active_LE: torch.Tensor
) -> float:
    """FLOPs torch counts for one forward + backward of ``batch`` training ``active_LE``."""
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
