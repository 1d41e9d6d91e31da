"""The budget cost model against what a real step costs: counted FLOPs and measured peak memory.

Test and benchmark harness (``tests/test_budget.py``, ``bench/budget.py``), not part of the
package: it trains real clients and so needs every layer of hfedmoe. Step FLOPs are counted by
torch's ``FlopCounterMode`` (every matmul the step really runs); memory by
:class:`hfedmoe.training.PeakMemory`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from hfedmoe.algorithms import build_algorithm
from hfedmoe.algorithms.maths.importance import select_active
from hfedmoe.budget import CostModels, build_cost_model
from hfedmoe.federation.workload import client_data, client_model, label_names
from hfedmoe.foundation.config import ExperimentConfig, load
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.state import held_bytes, shared_state
from hfedmoe.training import StepHooks, train_local

REPO = Path(__file__).resolve().parents[2]


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


#: A script for a fresh process: ``python -c MEASURE_SMALL_DEVICE ALGORITHM`` prints the JSON
#: of :func:`measure_algorithm_client` on :func:`small_device_config`'s device.
MEASURE_SMALL_DEVICE = """
import json, sys, torch
from tests.support.calibration import measure_algorithm_client, small_device_config
torch.set_num_threads(2)
cfg = small_device_config(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
print(json.dumps(measure_algorithm_client(cfg, cfg.devices.tiers[0].name)))
"""


def small_device_config(algorithm: str, local_steps: int = 2) -> ExperimentConfig:
    """configs/hfedmoe.toml with ``algorithm``, ``local_steps`` and one device tier that fits
    little: 4 tuned experts and one merged per layer (FLUX, whose routers and shared parameters
    do not train), k = 1 (FFT-MoE), or C_budget = 4 (the others)."""
    overrides = [f"algorithm={algorithm}", f"train.local_steps={local_steps}"]
    cfg = load(REPO / "configs" / "hfedmoe.toml", overrides)
    model = client_model(cfg, label_names(cfg))
    costs = CostModels(model, cfg)
    if algorithm == "flux":
        held = 4 + ExpertModel(model).num_layers
        cost = costs.at(experts_only=True).predict(4, held=held)
    elif algorithm == "fftmoe":
        cost = costs.at(1).predict(costs.at(1).num_experts)
    else:
        cost = costs.at().predict(4)
    tiers = [t.model_copy(update={"memory": cost.peak_bytes}) for t in cfg.devices.tiers[:1]]
    return cfg.model_copy(update={"devices": cfg.devices.model_copy(update={"tiers": tiers})})


def measure_algorithm_client(cfg: ExperimentConfig, tier: str, partition_id: int = 0) -> dict:
    """One client of ``cfg.algorithm`` on device ``tier`` in round 1, as a run does it: its
    device budget, the server's request, the algorithm's own price of it (experts trained and
    held), local training; the prediction against what the client measured. Run it in a fresh
    process, as :func:`measure_client_memory`."""
    algorithm = build_algorithm(cfg)
    device = next(t for t in cfg.devices.tiers if t.name == tier)
    model = client_model(cfg, label_names(cfg))
    data = client_data(cfg, partition_id, cfg.federation.num_clients)
    costs = CostModels(model, cfg)
    server = build_algorithm(cfg)
    server.bind(model)  # the same architecture as the server's global model
    server.set_budgets({partition_id: algorithm.device_budget(costs, device)})
    request = server.configure_client(1, dict(shared_state(model)), partition_id)
    request.device = device
    price = algorithm.priced(costs, request)
    update = algorithm.train_client(model, data, request, np.random.default_rng(cfg.seed))
    return {
        "budget": server.budgets[partition_id],
        "predicted_bytes": price.model.step_extra_bytes(price.experts),
        "measured_bytes": update.metrics.get("memory_measured_bytes"),
        "held_predicted_bytes": price.model.resident(price.held),
        "held_bytes": update.metrics.get("memory_held_bytes", held_bytes(model)),
        "unmerged_bytes": held_bytes(model),
        "fits": price.model.fits(price.experts, device, held=price.held),
        "train_seconds": update.metrics["train_seconds"],
    }
