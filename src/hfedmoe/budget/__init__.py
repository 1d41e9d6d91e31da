"""Device budgets (METHOD.md §6): which device each client has, and the cost model that turns a
device into C_budget(c), the experts it can train per batch."""

from hfedmoe.budget.cost_model import (
    BudgetExceeded,
    Cost,
    CostModel,
    CostModels,
    Price,
    build_cost_model,
    check_request,
    check_tiers,
    minimum_budget,
    probe_batch,
)
from hfedmoe.budget.devices import assign_tiers, tier_counts

__all__ = [
    "BudgetExceeded",
    "Cost",
    "CostModel",
    "CostModels",
    "Price",
    "assign_tiers",
    "build_cost_model",
    "check_request",
    "check_tiers",
    "minimum_budget",
    "probe_batch",
    "tier_counts",
]
