"""AdamW that can leave some experts of a fused expert tensor completely untouched.

Written by hand because no torch optimizer can restrict an update to part of a tensor: zeroing
the gradient entries of an inactive expert still lets Adam's momentum and the weight decay move
them (METHOD.md §7: "an expert outside E_active must not move at all"). Here each fused tensor
keeps one step counter per expert, and a step updates only the positions of active experts: the
values of the others stay bit-identical.

One semantics for every expert layout (:class:`ExpertAdamW`): an expert outside E_active on a
step is not moved, and (METHOD.md §7's default, ``train.inactive_expert_state = "drop"``) it
holds no optimizer state afterwards (its moments and step count are forgotten), so at most
C_budget experts hold state at any time and an expert that comes back starts afresh, as a new
optimizer would start it. A per-module expert gets this from torch's AdamW by dropping its
state; a fused tensor by zeroing the inactive experts' moments and step counts
(``forget_inactive``). The other option (``"keep"``) keeps an inactive expert's moments and
step count frozen, and it resumes from them when it is next active.

Where the experts sit in a tensor is an :class:`~hfedmoe.model.expert_axis.ExpertAxis` (row e of
a fused weight; the rank-r slices of a LoRA on it).

Parameters without an axis follow torch.optim.AdamW's formula (decoupled weight decay,
bias-corrected moments); a parameter whose ``grad`` is None is skipped entirely.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from hfedmoe.model.expert_axis import ExpertAxis


class MaskedAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        expert_axes: Mapping[torch.nn.Parameter, ExpertAxis] | None = None,
        forget_inactive: bool = False,
    ):
        """``expert_axes``: the fused expert tensors whose experts may be masked, and where;
        ``forget_inactive``: a masked expert's moments and step count are reset (it holds no
        state), else they are kept as they were."""
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.axes = {id(p): axis for p, axis in (expert_axes or {}).items()}
        self.forget_inactive = forget_inactive

    @torch.no_grad()
    def step(self, active: Mapping[torch.nn.Parameter, torch.Tensor] | None = None) -> None:  # type: ignore[override]
        """One update; ``active[p]`` (an (E,) bool mask) restricts a parameter with an axis.

        A parameter with an axis but missing from ``active`` updates all its experts; one
        without a gradient updates none.
        """
        active = active or {}
        for group in self.param_groups:
            hyper = group["lr"], *group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                axis = self.axes.get(id(p))
                if p.grad is None:  # not in this step's graph: no expert of it is active
                    if self.forget_inactive and axis is not None and self.state.get(p):
                        _forget(self.state[p], axis, torch.ones(axis.num_experts, dtype=torch.bool))
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    # one step count per expert where experts can be masked, else one in all
                    state["step"] = torch.zeros(axis.num_experts if axis else (), device=p.device)
                if axis is None:
                    state["step"] += 1
                    _adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], *hyper)
                    continue
                experts = active.get(p, torch.ones(axis.num_experts, dtype=torch.bool)).cpu()
                if self.forget_inactive and not experts.all():
                    _forget(state, axis, ~experts)
                idx = axis.positions(experts)
                if idx.numel() == 0:
                    continue
                state["step"][experts.to(p.device)] += 1
                shape = [1] * p.dim()
                shape[axis.dim] = -1  # per-position step, broadcast over the other dims
                step = state["step"][axis.expert_of[idx].to(p.device)].view(shape)
                idx = idx.to(p.device)
                value, m, v = (
                    t.index_select(axis.dim, idx)
                    for t in (p, state["exp_avg"], state["exp_avg_sq"])
                )
                _adamw(value, p.grad.index_select(axis.dim, idx), m, v, step, *hyper)
                for target, new in ((p, value), (state["exp_avg"], m), (state["exp_avg_sq"], v)):
                    target.index_copy_(axis.dim, idx, new)


def _forget(state: dict, axis: ExpertAxis, experts_E: torch.Tensor) -> None:
    """Reset the moments and step counts of ``experts_E`` (as if they had never been stepped)."""
    idx = axis.positions(experts_E).to(state["exp_avg"].device)
    for key in ("exp_avg", "exp_avg_sq"):
        state[key].index_fill_(axis.dim, idx, 0)
    state["step"][experts_E.to(state["step"].device)] = 0


def _adamw(p, grad, m, v, step, lr, b1, b2, eps, wd) -> None:
    """In place: torch.optim.AdamW's update of ``p`` with moments ``m``, ``v`` at ``step``."""
    p.mul_(1 - lr * wd)
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    bias1 = 1 - b1**step
    bias2_sqrt = (1 - b2**step).sqrt()
    p.sub_(lr * (m / bias1) / (v.sqrt() / bias2_sqrt + eps))


class ExpertAdamW:
    """AdamW for a whole MoE model: torch's fused AdamW for every parameter except the fused
    expert tensors, whose experts :class:`MaskedAdamW` can leave untouched.

    Split so that the bulk of the parameters takes torch's single-kernel path (measured 5-10x
    faster than a Python loop on CPU); only fused expert tensors pay for masking.

    The same semantics for both layouts (METHOD.md §7): an expert outside E_active in a step
    (a per-module expert without a gradient; a fused tensor's expert masked in ``active``) is
    not moved. With ``forget_inactive`` (the default) its moments and step count are dropped:
    at most C_budget experts hold optimizer state at any time, which is what bounds a client's
    memory (``hfedmoe.budget``), and an expert that comes back restarts its moments, as a
    freshly created optimizer would. Without it they are kept frozen and resumed; every expert
    active at some step of the round then holds state, beyond what the cost model counts.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        expert_axes: Mapping[torch.nn.Parameter, ExpertAxis],
        lr: float,
        weight_decay: float,
        forget_inactive: bool = True,
    ):
        axis_ids = {id(p) for p in expert_axes}
        params = [p for p in params if p.requires_grad]
        plain = [p for p in params if id(p) not in axis_ids]
        fused = [p for p in params if id(p) in axis_ids]
        hyper = {"lr": lr, "weight_decay": weight_decay}
        self.forget_inactive = forget_inactive
        self.plain = torch.optim.AdamW(plain, **hyper, fused=True) if plain else None
        self.masked = (
            MaskedAdamW(fused, **hyper, expert_axes=expert_axes, forget_inactive=forget_inactive)
            if fused
            else None
        )

    @property
    def param_groups(self) -> list[dict]:
        """Both parts' parameter groups: what ``torch.amp.GradScaler`` unscales and checks for
        overflow before it lets :meth:`step` run (``train.precision = "fp16"``)."""
        return [g for opt in (self.plain, self.masked) if opt is not None for g in opt.param_groups]

    def step(self, active: Mapping[torch.nn.Parameter, torch.Tensor] | None = None) -> None:
        if self.plain is not None:
            self.plain.step()  # skips a parameter without a gradient: its state stays as it was
            if self.forget_inactive:
                for group in self.plain.param_groups:
                    for p in group["params"]:
                        if p.grad is None:
                            self.plain.state.pop(p, None)
        if self.masked is not None:
            self.masked.step(active)

    def zero_grad(self) -> None:
        for opt in (self.plain, self.masked):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
