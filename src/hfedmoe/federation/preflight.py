"""What can be checked of an experiment before a run directory exists: the algorithm, the
device, the model source, the data and every device tier. Bad input fails here, as one
:class:`~hfedmoe.foundation.errors.HFedMoEError` naming the setting, so nothing is written.

The same builders as the ServerApp and ClientApp (``workload``, the cost model), so what passes
here is what the run will build.
"""

from __future__ import annotations

from pathlib import Path

from hfedmoe.algorithms import build_algorithm
from hfedmoe.budget import CostModels, check_tiers
from hfedmoe.data.datasets import SERVER, read_own
from hfedmoe.federation.workload import client_model, label_names
from hfedmoe.foundation.assets import resolve_model_dir
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.factory import FITS, check_model_dir
from hfedmoe.model.sources import SHIPPED_GGUF
from hfedmoe.training import resolve_device


def check_experiment(cfg: ExperimentConfig) -> None:
    """Raise :class:`HFedMoEError` for the first problem of ``cfg`` found before a run starts."""
    algorithm = build_algorithm(cfg)
    resolve_device(cfg.train.device)  # a device torch cannot see fails here
    if cfg.model.name_or_path in SHIPPED_GGUF:  # a decoder, converted on first use
        if "decoder" not in FITS[cfg.data.task]:
            raise HFedMoEError(
                f"data.task: '{cfg.data.task}' needs a {' or '.join(FITS[cfg.data.task])} "
                f"model; '{cfg.model.name_or_path}' is a decoder"
            )
    else:
        directory = resolve_model_dir(cfg.model.name_or_path)
        check_model_dir(directory, cfg.data.task, cfg.model.name_or_path)
    if cfg.data.path and not Path(cfg.data.path).expanduser().exists():
        raise HFedMoEError(f"data.path: '{cfg.data.path}' does not exist")
    for i, path in enumerate(cfg.data.client_paths or []):  # read by each client, not here
        if not Path(path).expanduser().exists():
            raise HFedMoEError(f"data.client_paths[{i}]: '{path}' does not exist")
    if cfg.data.clients == "own" and cfg.data.test_path:  # the one file the server reads
        read_own(cfg.data, cfg.data.test_path, "data.test_path", SERVER, cfg.data.max_test_examples)
    labels = label_names(cfg)  # reads the data: a bad file fails here, before any output
    if cfg.devices.tiers:  # a device too small to train anything is a config error
        model = client_model(cfg, labels)
        num_layers = ExpertModel(model).num_layers
        costs = CostModels(model, cfg)
        check_tiers(
            cfg,
            costs.at(),
            num_layers,
            algorithm.holds_subset,
            budget_of=lambda tier: algorithm.device_budget(costs, tier),
        )
