"""Named variants of HFedMoE: the paper's method with one of METHOD.md §7's readings taken the
other way, run beside ``hfedmoe`` (never in its place), each with its own rows in the results.

* ``hfedmoe-batch-usage``: u_c(e) of eq. (16) over the batches the client drew while training
  (``usage_over = "batches"``) instead of over all of D_c in a pass after training (§7's
  default). The pass costs a forward over the client's whole data each round, which on the
  slow device tiers is most of HFedMoE's time on the devices (docs/RESULTS.md, setting (d));
  this variant asks whether eq. (16) needs it.
"""

from __future__ import annotations

from typing import ClassVar

from hfedmoe.algorithms.base import register
from hfedmoe.algorithms.hfedmoe import HFedMoE


@register
class BatchUsage(HFedMoE):
    name = "hfedmoe-batch-usage"
    forced: ClassVar[dict[str, object]] = {"usage_over": "batches"}
