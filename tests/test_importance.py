"""HFedMoE's importance and selection maths (METHOD.md §2-§3), on numbers worked out by hand.

One layer, two samples, three experts:

    G = [[0.7, 0.2, 0.1],      sample 1
         [0.1, 0.2, 0.7]]      sample 2

    s_cumul = (0.4, 0.2, 0.4)                                  eq. (3)
    s_spec  = (0.7, 0.2, 0.7)                                  eq. (4)
    s_b     = (0.55, 0.2, 0.55)                 lambda = 0.5,  eq. (5)
    p(z)    = (0.4, 0.2, 0.4)                                  eq. (10)
    KL_0 = KL_2 = (0.7 ln(0.7/0.4) + 0.1 ln(0.1/0.4)) / 2
                = (0.3917311 - 0.1386294) / 2 = 0.1265508;  KL_1 = 0   eq. (11)
    I_b     = s_b - beta KL: beta = 1 -> (0.4234492, 0.2, 0.4234492)
                             beta = 4 -> (0.0437968, 0.2, 0.0437968)   eq. (14)

Expert 1 is equally useful to every sample; experts 0 and 2 swing. A strong bottleneck (beta=4)
ranks the steady expert first.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfedmoe.algorithms.maths.importance import (
    activation_kl,
    batch_importance,
    cumulative_importance,
    ib_score,
    select_active,
    specific_importance,
)

G = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]]])  # (L=1, B=2, E=3)


def close(a, b):
    torch.testing.assert_close(a, torch.tensor(b), atol=1e-6, rtol=0)


def test_eq3_cumulative_importance():
    close(cumulative_importance(G), [[0.4, 0.2, 0.4]])


def test_eq4_specific_importance():
    close(specific_importance(G), [[0.7, 0.2, 0.7]])


def test_eq5_batch_importance_mixes_them():
    close(batch_importance(G, lam=0.5), [[0.55, 0.2, 0.55]])
    close(batch_importance(G, lam=1.0), [[0.4, 0.2, 0.4]])
    close(batch_importance(G, lam=0.0), [[0.7, 0.2, 0.7]])


def test_eq11_kl_penalises_experts_that_swing():
    close(activation_kl(G), [[0.1265508, 0.0, 0.1265508]])


def test_eq14_information_bottleneck_score():
    close(ib_score(G, lam=0.5, beta=1.0), [[0.4234492, 0.2, 0.4234492]])
    close(ib_score(G, lam=0.5, beta=4.0), [[0.0437968, 0.2, 0.0437968]])


def test_eq15_top_budget_of_the_routed_experts():
    score = ib_score(G, lam=0.5, beta=4.0)
    everyone = torch.ones(1, 3, dtype=torch.bool)
    assert select_active(score, everyone, budget=1).tolist() == [[False, True, False]]
    # a tie (experts 0 and 2) breaks by position
    assert select_active(score, everyone, budget=2).tolist() == [[True, True, False]]
    # only routed experts can be chosen (E_active is a subset of E_union)
    routed = torch.tensor([[True, False, True]])
    assert select_active(score, routed, budget=1).tolist() == [[True, False, False]]
    assert select_active(score, routed, budget=5).tolist() == [[True, False, True]]
    assert not select_active(score, everyone, budget=0).any()


def test_eq15_budget_scope_global_or_per_layer():
    score = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3]])
    routed = torch.ones(2, 3, dtype=torch.bool)
    # global: the three best pairs are all in layer 0
    assert select_active(score, routed, 3, "global").tolist() == [
        [True, True, True],
        [False, False, False],
    ]
    # per layer: 3 // 2 = 1 each, the remainder to layer 0
    assert select_active(score, routed, 3, "per_layer").tolist() == [
        [True, True, False],
        [False, False, True],
    ]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_selection_invariants(data):
    L, E = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    score = torch.tensor(data.draw(st.lists(st.floats(-5, 5), min_size=L * E, max_size=L * E)))
    routed = torch.tensor(data.draw(st.lists(st.booleans(), min_size=L * E, max_size=L * E)))
    score, routed = score.reshape(L, E), routed.reshape(L, E)
    budget = data.draw(st.integers(0, L * E + 2))
    for scope in ("global", "per_layer"):
        active = select_active(score, routed, budget, scope)
        assert not (active & ~routed).any()  # a subset of E_union
        assert int(active.sum()) <= budget  # never over budget
    active = select_active(score, routed, budget, "global")
    assert int(active.sum()) == min(budget, int(routed.sum()))  # the budget is used
    if active.any() and (routed & ~active).any():  # every chosen pair beats every unchosen one
        assert score[active].min() >= score[routed & ~active].max()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(2, 5), st.integers(0, 10_000))
def test_scores_are_bounded_and_kl_nonnegative(B, E, seed):
    G = torch.softmax(torch.randn(2, B, E, generator=torch.Generator().manual_seed(seed)), -1)
    assert (activation_kl(G) >= -1e-6).all()
    s = batch_importance(G, 0.3)
    assert ((s >= 0) & (s <= 1 + 1e-6)).all()
    assert (cumulative_importance(G) <= specific_importance(G) + 1e-6).all()
    torch.testing.assert_close(ib_score(G, 0.3, 0.0), s)
    assert (ib_score(G, 0.3, 10.0) <= s + 1e-6).all()  # KL >= 0: a bottleneck never raises one
