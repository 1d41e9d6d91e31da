"""HFedMoE's aggregation maths (METHOD.md §4), on two clients worked out by hand.

One layer, three experts, tau = 0.25, |D| = (10, 30):

    u = [[0.5, 0.3, 0.2],     client 1:  S_1 = {0, 1}
         [0.1, 0.6, 0.3]]     client 2:  S_2 = {1, 2};   S_global = {0, 1, 2}
    updated in >= 1 batch:  client 1 {0, 1}, client 2 {1}

eq. (17), usage AND updated:  e0 <- client 1 only (1, 0); e1 <- (10, 30) / 40 = (0.25, 0.75);
                              e2 <- nobody (0, 0): keep the previous expert
          usage alone:        e2 <- client 2 only (0, 1)
eq. (18): r = (2/3, 2/3)
eq. (19), s = [[0.4, 0.5, 0.1], [0.2, 0.3, 0.6]]:
          p_1 = (0.5*0.4, 0.3*0.5) = (0.2, 0.15);  p_2 = (0.6*0.3, 0.3*0.6) = (0.18, 0.18)
eq. (20): alpha = (0.35 / 3, 0.36 / 3) = (0.1166667, 0.12)
          normalised: (0.35 / 0.71, 0.36 / 0.71) = (0.4929577, 0.5070423)
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfedmoe.algorithms.maths.sparse_aggregation import (
    combine,
    expert_weights,
    qualifies,
    router_weights,
    routing_consistency,
    usage,
)

U = torch.tensor([[[0.5, 0.3, 0.2]], [[0.1, 0.6, 0.3]]])  # (C=2, L=1, E=3)
S = torch.tensor([[[0.4, 0.5, 0.1]], [[0.2, 0.3, 0.6]]])
UPDATES = torch.tensor([[[3, 1, 0]], [[0, 2, 0]]])
N = torch.tensor([10, 30])
TAU = 0.25


def close(a, b):
    torch.testing.assert_close(
        a.to(torch.float64), torch.tensor(b, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_eq16_usage_is_the_mean_gate_over_local_data():
    close(usage(torch.tensor([[2.0, 6.0]]), 8), [[0.25, 0.75]])


def test_eq17_experts_weighted_by_data_among_clients_that_really_trained_them():
    w = expert_weights(N, qualifies(U, TAU, UPDATES))
    close(w[:, 0], [[1.0, 0.25, 0.0], [0.0, 0.75, 0.0]])
    w_usage_only = expert_weights(N, qualifies(U, TAU))
    close(w_usage_only[:, 0], [[1.0, 0.25, 0.0], [0.0, 0.75, 1.0]])


def test_eq18_routing_consistency():
    close(routing_consistency(U >= TAU), [2 / 3, 2 / 3])


def test_eq19_20_router_weights():
    close(router_weights(U, S, TAU, normalize=False)[:, 0], [0.35 / 3, 0.36 / 3])
    close(router_weights(U, S, TAU)[:, 0], [0.35 / 0.71, 0.36 / 0.71])


def test_eq19_20_alpha_over_all_layers_by_hand():
    """METHOD.md §7's other scope: one alpha(c) per client over every (layer, expert) pair.

    A second layer beside the one above, u = [[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]] and
    s = [[0.5, 0.1, 0.1], [0.1, 0.1, 0.5]]: S_1 = {0}, S_2 = {2}, p = 0.3 each, S_global = {0, 2}.
    Per layer, layer 1: alpha = (0.3 / 2, 0.3 / 2), normalised (1/2, 1/2).
    Over all layers: masses 0.35 + 0.3 = 0.65 and 0.36 + 0.3 = 0.66, |S_global| = 3 + 2 = 5:
    alpha = (0.13, 0.132) for both routers, normalised (0.65 / 1.31, 0.66 / 1.31)."""
    u = torch.cat([U, torch.tensor([[[0.6, 0.2, 0.2]], [[0.2, 0.2, 0.6]]])], dim=1)
    s = torch.cat([S, torch.tensor([[[0.5, 0.1, 0.1]], [[0.1, 0.1, 0.5]]])], dim=1)
    per_layer = router_weights(u, s, TAU, normalize=False)
    close(per_layer, [[0.35 / 3, 0.15], [0.36 / 3, 0.15]])
    close(router_weights(u, s, TAU), [[0.35 / 0.71, 0.5], [0.36 / 0.71, 0.5]])
    close(
        router_weights(u, s, TAU, normalize=False, scope="all_layers"),
        [[0.13, 0.13], [0.132, 0.132]],
    )
    close(
        router_weights(u, s, TAU, scope="all_layers"),
        [[0.65 / 1.31, 0.65 / 1.31], [0.66 / 1.31, 0.66 / 1.31]],
    )


def test_a_layer_nobody_dominates_gets_no_router_weight():
    assert not router_weights(torch.full((2, 1, 3), 0.1), S, TAU).any()


def test_eq21_combination():
    routers = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    close(combine(routers, torch.tensor([0.25, 0.75])), [0.25, 0.75])


# ---- properties --------------------------------------------------------------

clients = st.integers(1, 4)


@st.composite
def client_stats(draw):
    C, L, E = draw(clients), draw(st.integers(1, 2)), draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    u = torch.softmax(torch.randn(C, L, E, generator=g) * 2, -1)
    s = torch.rand(C, L, E, generator=g)
    updates = torch.randint(0, 3, (C, L, E), generator=g)
    n = torch.randint(1, 50, (C,), generator=g)
    return u, s, updates, n, draw(st.floats(0.0, 0.6))


@settings(max_examples=80, deadline=None)
@given(client_stats())
def test_expert_weights_are_a_distribution_or_nothing(stats):
    u, _, updates, n, tau = stats
    q = qualifies(u, tau, updates)
    w = expert_weights(n, q)
    total = w.sum(0)
    assert torch.allclose(total[q.any(0)], torch.ones(()).double())
    assert (total[~q.any(0)] == 0).all()  # an expert no qualifying client trained is unchanged
    assert (w[~q] == 0).all()


@settings(max_examples=80, deadline=None)
@given(client_stats(), st.randoms())
def test_permuting_clients_permutes_the_weights(stats, rnd):
    u, s, updates, n, tau = stats
    perm = list(range(u.shape[0]))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    w = expert_weights(n, qualifies(u, tau, updates))
    torch.testing.assert_close(
        expert_weights(n[perm], qualifies(u[perm], tau, updates[perm])), w[perm]
    )
    a = router_weights(u, s, tau)
    torch.testing.assert_close(router_weights(u[perm], s[perm], tau), a[perm])


@settings(max_examples=80, deadline=None)
@given(client_stats())
def test_normalised_router_is_a_convex_combination(stats):
    u, s, _, _, tau = stats
    alpha = router_weights(u, s, tau)
    assert (alpha >= 0).all()
    layers_with_weight = alpha.sum(0) > 0
    assert torch.allclose(alpha.sum(0)[layers_with_weight], torch.ones(()).double())
    g = torch.Generator().manual_seed(0)
    routers = [torch.rand(3, 4, generator=g) for _ in range(u.shape[0])]
    for layer in torch.nonzero(layers_with_weight).flatten().tolist():
        mixed = combine(routers, alpha[:, layer])
        lo = torch.stack(routers).amin(0)
        hi = torch.stack(routers).amax(0)
        assert ((mixed >= lo - 1e-6) & (mixed <= hi + 1e-6)).all()


@settings(max_examples=40, deadline=None)
@given(client_stats())
def test_identical_client_copies_aggregate_to_that_copy(stats):
    u, _, updates, n, tau = stats
    x = torch.randn(5)
    for layer_weights in (
        expert_weights(n, qualifies(u, tau, updates)).permute(1, 2, 0).reshape(-1, u.shape[0])
    ):
        if layer_weights.sum() > 0:
            torch.testing.assert_close(combine([x] * u.shape[0], layer_weights), x)
