"""Where the experts sit along one dimension of a tensor that holds several of them.

For transformers' fused expert weights expert e is row e (dim 0); for a PEFT LoRA on them,
expert e owns rows e*r..e*r+r-1 of lora_A and the strided columns e, e+E, ... of lora_B. The
expert interface (:mod:`hfedmoe.model.experts`) finds the axes; the optimizer
(:class:`hfedmoe.training.MaskedAdamW`) and the server's per-expert reads and writes use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertAxis:
    """Position i along ``dim`` belongs to expert ``expert_of[i]`` (of ``num_experts``)."""

    dim: int
    expert_of: torch.Tensor  # (size along dim,) long
    num_experts: int

    @classmethod
    def rows(cls, num_experts: int) -> ExpertAxis:
        return cls(0, torch.arange(num_experts), num_experts)

    def positions(self, experts_E: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` of the experts selected by the (E,) bool mask."""
        return experts_E[self.expert_of].nonzero().squeeze(1)

    def positions_of(self, e: int) -> torch.Tensor:
        """Indices along ``dim`` that belong to expert ``e``."""
        return (self.expert_of == e).nonzero().squeeze(1)
