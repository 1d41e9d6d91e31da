"""The four HFedMoE ablations of METHOD.md §9: HFedMoE with one part swapped for the plain one.

Each is a registered algorithm, so a comparison grid names it like any method; each is only a
fixed setting of ``[hfedmoe]``, so the code that runs is HFedMoE's own:

* ``hfedmoe-rank-s``: eq. (15) ranks by s_b (eq. (5)) instead of I_b (eq. (14));
  ``ranking = "importance"``.
* ``hfedmoe-lambda1``: lambda = 1 in eq. (5), no specific importance; ``lam = 1.0``.
* ``hfedmoe-holder-avg``: each expert averaged by |D_c| over every client that updated it (no
  usage threshold) instead of eq. (17); ``expert_aggregation = "holders"``.
* ``hfedmoe-fedavg-routers``: routers by FedAvg over |D_c| instead of eqs. (19)-(21);
  ``router_aggregation = "fedavg"``.
"""

from __future__ import annotations

from typing import ClassVar

from hfedmoe.algorithms.base import register
from hfedmoe.algorithms.hfedmoe import HFedMoE


@register
class RankByImportance(HFedMoE):
    name = "hfedmoe-rank-s"
    forced: ClassVar[dict[str, object]] = {"ranking": "importance"}


@register
class NoSpecificImportance(HFedMoE):
    name = "hfedmoe-lambda1"
    forced: ClassVar[dict[str, object]] = {"lam": 1.0}


@register
class HolderAveraging(HFedMoE):
    name = "hfedmoe-holder-avg"
    forced: ClassVar[dict[str, object]] = {"expert_aggregation": "holders"}


@register
class FedAvgRouters(HFedMoE):
    name = "hfedmoe-fedavg-routers"
    forced: ClassVar[dict[str, object]] = {"router_aggregation": "fedavg"}
