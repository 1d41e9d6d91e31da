"""Per-client (personalised) evaluation: the test split reweighted to each client's mix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hfedmoe.data.tokenized import TokenizedDataset
from hfedmoe.training import evaluate
from hfedmoe.training.personal import key_shares, personalised


def test_key_shares_by_hand():
    keys = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    np.testing.assert_allclose(key_shares(parts, keys, 3), [[2 / 3, 1 / 3, 0], [0, 0, 1]])


def test_a_client_sees_the_test_split_in_its_own_proportions():
    # test: key 0 -> accuracies 1, 0 (mean 0.5); key 1 -> 1, 1, 1 (mean 1); key 2 -> none
    values = np.array([1.0, 0.0, 1.0, 1.0, 1.0])
    keys = np.array([0, 0, 1, 1, 1])
    shares = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.0, 0.8], [0.0, 0.0, 1.0]])
    got = personalised(values, keys, shares)
    # client 0: 0.5*0.5 + 0.5*1; client 1: 0.5; client 2: key 2 absent from test, so key 0
    # alone; client 3: nothing of its own to test on
    np.testing.assert_allclose(got[:3], [0.75, 0.5, 0.5])
    assert np.isnan(got[3])


@given(st.lists(st.integers(0, 3), min_size=4, max_size=40), st.integers(0, 1000))
def test_a_client_with_the_test_splits_own_mix_scores_the_global_mean(keys, seed):
    keys = np.asarray(keys)
    values = np.random.default_rng(seed).random(len(keys))
    shares = np.bincount(keys, minlength=4)[None, :] / len(keys)
    assert personalised(values, keys, shares)[0] == pytest.approx(values.mean())


class _Fixed(torch.nn.Module):
    """Predicts class 0 with probability 0.75 for every example (classification)."""

    config = type("C", (), {"is_encoder_decoder": False})()

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.log(torch.tensor([0.75, 0.25])).expand(len(input_ids), 2)
        return type("O", (), {"logits": logits + self.w})()


def test_evaluation_returns_each_examples_accuracy_and_loss():
    data = TokenizedDataset([[1, 2], [3], [4, 5, 6]], np.array([0, 1, 0]), pad_id=0)
    result = evaluate(_Fixed(), data, batch_size=2)
    np.testing.assert_allclose(result.accuracy_N, [1, 0, 1])
    np.testing.assert_allclose(result.loss_N, -np.log([0.75, 0.25, 0.75]), rtol=1e-6)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.loss == pytest.approx(result.loss_N.mean())
