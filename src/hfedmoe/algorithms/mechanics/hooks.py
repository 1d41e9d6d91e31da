"""Client-side per-step hooks of the budget-aware algorithms (``hfedmoe.training.StepHooks``)."""

from __future__ import annotations

import torch
from torch import nn

from hfedmoe.algorithms.maths.sparse_aggregation import usage
from hfedmoe.algorithms.mechanics.assignment import mask_of
from hfedmoe.algorithms.messages import TrainRequest
from hfedmoe.data.tokenized import TokenizedDataset, sequential_batches
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.routing import RoutingCapture, lean_forward
from hfedmoe.training import StepHooks
from hfedmoe.training.device import on_device, to_device


class GateUsage:
    """Running sum of G_e(x) over a client's samples; :meth:`value` is u_c(e), eq. (16)."""

    def __init__(self) -> None:
        self.gate_sum: torch.Tensor | None = None  # sum over samples of G_e(x), (L, E)
        self.samples = 0

    def add(self, G_LBE: torch.Tensor) -> None:
        gate_sum = G_LBE.sum(1)
        self.gate_sum = gate_sum if self.gate_sum is None else self.gate_sum + gate_sum
        self.samples += G_LBE.shape[1]

    def value(self) -> torch.Tensor:
        return usage(self.gate_sum, self.samples)


@torch.no_grad()
def usage_over_data(
    model: nn.Module, data: TokenizedDataset, batch_size: int, device: str = "cpu"
) -> torch.Tensor:
    """u_c(e), eq. (16), as METHOD.md §7 defines it: the mean of G_e(x) over every sample of the
    client's data D_c, in eval mode (no dropout), one forward pass (no loss, no gradients)."""
    em = ExpertModel(model)
    total = GateUsage()
    lean = lean_forward(model)  # the routers are read, the logits are not
    with on_device(model, device) as dev:
        model.eval()
        for idx in sequential_batches(len(data), batch_size):
            batch = data.inputs(idx)
            with em.capture() as capture:
                model(**to_device(batch, dev), **lean)
            total.add(capture.sample_probs(batch.get("attention_mask")))
    return total.value()


class AssignedExperts(StepHooks):
    """Update the assigned experts on the batches routed to them (all routed ones if none),
    and record the client's usage u_c(e) (``self.usage``)."""

    def __init__(self, assigned_LE: torch.Tensor | None):
        self.assigned_LE = assigned_LE
        self.usage = GateUsage()

    @classmethod
    def from_request(cls, request: TrainRequest, shape: tuple[int, int]) -> AssignedExperts:
        return cls(mask_of(request, shape))

    def select_experts(
        self, capture: RoutingCapture, batch: dict[str, torch.Tensor], routed_LE: torch.Tensor
    ) -> torch.Tensor:
        self.usage.add(capture.sample_probs(batch.get("attention_mask")))
        return routed_LE if self.assigned_LE is None else routed_LE & self.assigned_LE
