"""Three clients on three device tiers sized so that their budgets are 2, 5 and all 8 experts."""

from __future__ import annotations

from pathlib import Path

from hfedmoe.algorithms import build_algorithm
from hfedmoe.budget import build_cost_model
from hfedmoe.federation.workload import client_model, label_names
from hfedmoe.foundation.config import validate

from .configs import tiny_raw


def three_tiers(
    tiny_bert_dir: Path,
    algorithm: str,
    mode: str = "backward-only",
    check_wire: bool = False,
    data: dict | None = None,
) -> dict:
    """Three clients on three devices: small (budget 2), medium (budget 5), large (all 8);
    ``data``: keys of ``[data]`` to change (before the tiers are sized: the head is the data's)."""
    raw = tiny_raw(
        tiny_bert_dir,
        algorithm=algorithm,
        federation={
            "num_clients": 3,
            "clients_per_round": 3,
            "rounds": 2,
            "check_wire": check_wire,
        },
        hfedmoe={"mode": mode},
    )
    raw["data"].update(data or {})
    cfg = validate(raw)
    model = client_model(cfg, label_names(cfg))
    costs = build_cost_model(model, cfg)
    strict = build_algorithm(cfg).holds_subset

    def between(c: int) -> int:  # memory that fits c experts per batch but not c + 1
        lo = costs.predict(c, held=c if strict else None).peak_bytes
        hi = costs.predict(c + 1, held=c + 1 if strict else None).peak_bytes
        return (lo + hi) // 2

    raw["devices"] = {
        "tiers": [
            {"name": "small", "memory": between(2)},
            {"name": "medium", "memory": between(5)},
            {"name": "large", "memory": 10 * costs.predict(costs.num_experts).peak_bytes},
        ],
        "assignment": ["small", "medium", "large"],
    }
    return raw
