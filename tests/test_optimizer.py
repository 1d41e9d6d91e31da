"""The optimizer local training uses (``ExpertAdamW``), tested directly.

METHOD.md §7: an expert outside E_active does not move (no gradient step, no moment step, no
weight decay), and the same algorithm must optimise the same way whatever the expert layout:
E separate expert modules (Switch, hfedmoe's upcycled blocks) or one fused (E, ...) tensor
(transformers' Mixtral, Qwen-MoE, OLMoE). Both hold optimizer state for the experts of the
current step only (at most C_budget), and an expert that comes back starts afresh.
"""

from __future__ import annotations

import pytest
import torch

from hfedmoe.model.expert_axis import ExpertAxis
from hfedmoe.training.optimizer import ExpertAdamW

E, D = 4, 3
LR, WD = 0.1, 0.1


class Modular:
    """E experts as E parameters; an inactive expert gets no gradient (``grad = None``)."""

    def __init__(self, init_ED: torch.Tensor, forget: bool = True):
        self.params = [torch.nn.Parameter(row.clone()) for row in init_ED]
        self.opt = ExpertAdamW(self.params, {}, lr=LR, weight_decay=WD, forget_inactive=forget)

    def step(self, grad_ED: torch.Tensor, active_E: torch.Tensor) -> None:
        for e, p in enumerate(self.params):
            p.grad = grad_ED[e].clone() if active_E[e] else None
        self.opt.step()
        self.opt.zero_grad()

    def values(self) -> torch.Tensor:
        return torch.stack([p.detach() for p in self.params])

    def experts_with_state(self) -> set[int]:
        return {e for e, p in enumerate(self.params) if self.opt.plain.state.get(p)}


class Fused:
    """E experts as rows of one (E, D) parameter; inactive rows' gradients are zeroed and the
    mask goes to the optimizer (what ``ExpertModel.expert_grad_mask`` does)."""

    def __init__(self, init_ED: torch.Tensor, forget: bool = True):
        self.param = torch.nn.Parameter(init_ED.clone())
        axes = {self.param: ExpertAxis.rows(E)}
        self.opt = ExpertAdamW([self.param], axes, lr=LR, weight_decay=WD, forget_inactive=forget)

    def step(self, grad_ED: torch.Tensor, active_E: torch.Tensor) -> None:
        self.param.grad = grad_ED * active_E.unsqueeze(1)
        self.opt.step({self.param: active_E})
        self.opt.zero_grad()

    def values(self) -> torch.Tensor:
        return self.param.detach().clone()

    def experts_with_state(self) -> set[int]:
        state = self.opt.masked.state.get(self.param, {})
        if not state:
            return set()
        moments = state["exp_avg"].abs().sum(1) + state["exp_avg_sq"].sum(1)
        return {e for e in range(E) if state["step"][e] > 0 or moments[e] > 0}


LAYOUTS = [Modular, Fused]


def test_first_step_by_hand():
    """AdamW's first step: p <- p (1 - lr wd) - lr g / (|g| + eps), per active expert."""
    for layout in LAYOUTS:
        opt = layout(torch.ones(E, D))
        grad = torch.full((E, D), 0.5)
        opt.step(grad, torch.tensor([True, False, True, False]))
        expected = torch.tensor([0.89, 1.0, 0.89, 1.0]).unsqueeze(1).expand(E, D)
        torch.testing.assert_close(opt.values(), expected, atol=1e-6, rtol=0)


def _schedule(steps: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        active = torch.rand(E, generator=g) < 0.5
        out.append((torch.randn(E, D, generator=g), active))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_inactive_expert_does_not_move_and_holds_no_state(layout):
    opt = layout(torch.randn(E, D, generator=torch.Generator().manual_seed(1)))
    for grad, active in _schedule():
        before = opt.values()
        opt.step(grad, active)
        after = opt.values()
        for e in range(E):
            if active[e]:
                assert not torch.equal(after[e], before[e])
            else:  # bit for bit: no gradient step, no moment step, no weight decay
                assert torch.equal(after[e], before[e])
        # at most the step's active experts (<= C_budget) hold optimizer state
        assert opt.experts_with_state() == {e for e in range(E) if active[e]}


def test_every_layout_optimises_the_same_way():
    """Experts that skip steps and come back: the same values on both layouts (up to float32
    rounding: torch's fused kernel and the masked path order their operations differently; a
    semantic difference, such as kept moments, moves values by about lr = 0.1)."""
    init = torch.randn(E, D, generator=torch.Generator().manual_seed(2))
    runs = [layout(init) for layout in LAYOUTS]
    for grad, active in _schedule(12):
        for opt in runs:
            opt.step(grad, active)
    torch.testing.assert_close(runs[0].values(), runs[1].values(), atol=1e-4, rtol=1e-4)


def test_an_expert_that_comes_back_starts_afresh():
    """Its step after a pause equals a first step from its current value."""
    for layout in LAYOUTS:
        opt = layout(torch.ones(E, D))
        g = torch.full((E, D), 0.5)
        every = torch.ones(E, dtype=torch.bool)
        opt.step(g, every)
        opt.step(-g, torch.tensor([False, True, True, True]))  # expert 0 sits out
        value = opt.values()[0].clone()
        opt.step(g, every)
        torch.testing.assert_close(opt.values()[0], value * (1 - LR * WD) - LR * 0.5 / (0.5 + 1e-8))


def test_an_expert_that_comes_back_resumes_its_kept_moments_by_hand():
    """``inactive_expert_state = "keep"`` (METHOD.md §7's other option): expert 0 steps with
    g = 0.5, sits out a step (not moved, its state kept), then steps with g = -0.5 as AdamW's
    second step from the kept moments:

        m = 0.9 (0.1 * 0.5) + 0.1 (-0.5) = -0.005,   m_hat = -0.005 / (1 - 0.9^2)
        v = 0.999 (0.001 * 0.25) + 0.001 * 0.25 = 0.00049975,  v_hat = v / (1 - 0.999^2) = 0.25
        p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)

    where dropping the moments would give a first step, p (1 - lr wd) + lr."""
    for layout in LAYOUTS:
        opt = layout(torch.ones(E, D), forget=False)
        g = torch.full((E, D), 0.5)
        every = torch.ones(E, dtype=torch.bool)
        opt.step(g, every)
        paused = opt.values()[0].clone()
        opt.step(g, torch.tensor([False, True, True, True]))  # expert 0 sits out
        assert torch.equal(opt.values()[0], paused)  # not moved
        assert 0 in opt.experts_with_state()  # but its moments are kept
        opt.step(-g, every)
        m_hat = (0.9 * 0.1 * 0.5 + 0.1 * -0.5) / (1 - 0.9**2)
        v_hat = (0.999 * 0.001 * 0.25 + 0.001 * 0.25) / (1 - 0.999**2)
        want = paused * (1 - LR * WD) - LR * m_hat / (v_hat**0.5 + 1e-8)
        torch.testing.assert_close(opt.values()[0], want, atol=1e-6, rtol=0)
        dropped = paused * (1 - LR * WD) + LR * 0.5 / (0.5 + 1e-8)
        assert not torch.allclose(opt.values()[0], dropped, atol=1e-3)
