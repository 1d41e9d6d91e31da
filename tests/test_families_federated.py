"""One federated round of every model family through the real Flower apps (embedded engine):
language modelling on BBC News texts, FedAvg over 2 clients, then the checkpoint reloads."""

from __future__ import annotations

import math

import pytest

from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.federation.workload import server_workload
from hfedmoe.foundation.config import validate
from hfedmoe.model import load_checkpoint
from hfedmoe.results import read_metrics
from hfedmoe.training import evaluate

from .support import families
from .support.configs import save_tiny_model, tiny_raw


@pytest.mark.parametrize("family", [*families.FAMILIES, "upcycled_llama"])
def test_one_federated_round(family, tiny_llama_dir, tmp_path):
    if family == "upcycled_llama":
        model_dir = tiny_llama_dir
    else:
        model_dir = save_tiny_model(
            tmp_path / family, lambda vocab: families.build(family, vocab=vocab)
        )
    raw = tiny_raw(
        model_dir,
        data={"task": "language-modeling", "max_train_examples": 40, "max_test_examples": 8},
        model={"max_length": 16},
        federation={"rounds": 1},
        train={"local_steps": 1, "batch_size": 4},
    )
    cfg = validate(raw)
    run_dir = tmp_path / "run"
    run_embedded(cfg, str(run_dir), server_app, client_app)

    _, first = read_metrics(run_dir)  # round 0 (the initial model), round 1
    assert first["clients_ok"] == 2 and first["clients_failed"] == 0
    assert math.isfinite(first["test_loss"]) and first["test_loss"] > 0
    for client in first["clients"]:
        assert client["experts_updated"] > 0
        assert client["bytes_up"] > 0
    model, _ = load_checkpoint(run_dir / "model")
    result = evaluate(model, server_workload(cfg).test, batch_size=8)
    assert result.loss == pytest.approx(first["test_loss"], rel=1e-5)
