"""Per-client (personalised) evaluation: the test split reweighted to each client's mix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hfedmoe.data.tokenized import TokenizedDataset
from hfedmoe.training import evaluate
from hfedmoe.training.personal import key_shares, personal_models, personalised


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
    """Predicts class 0 with probability 0.75 for every example (classification): logits
    log(0.75, 0.25) + ``bias``, the bias 0."""

    config = type("C", (), {"is_encoder_decoder": False})()

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(2))

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.log(torch.tensor([0.75, 0.25])).expand(len(input_ids), 2)
        return type("O", (), {"logits": logits + self.bias})()


def test_evaluation_returns_each_examples_accuracy_and_loss():
    data = TokenizedDataset([[1, 2], [3], [4, 5, 6]], np.array([0, 1, 0]), pad_id=0)
    result = evaluate(_Fixed(), data, batch_size=2)
    np.testing.assert_allclose(result.accuracy_N, [1, 0, 1])
    np.testing.assert_allclose(result.loss_N, -np.log([0.75, 0.25, 0.75]), rtol=1e-6)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.loss == pytest.approx(result.loss_N.mean())


def test_a_personal_model_is_scored_on_its_clients_own_distribution_by_hand():
    """Test labels (= keys) 0, 1, 0, 1, 1. Client 1 holds keys 0 and 1 in shares 0.25 / 0.75;
    its personal model (bias (0, 10)) predicts class 1 always: accuracy 0.25 * 0 + 0.75 * 1 =
    0.75, where the global model (class 0 always) scores 0.25; loss 0.25 * l(0) + 0.75 * l(1),
    l(y) = -log softmax(log(0.75, 0.25) + (0, 10))_y. Client 2 holds only key 2, absent from
    the test split: NaN. The model's own bias is back to 0 afterwards."""
    model = _Fixed()
    data = TokenizedDataset([[1], [2], [3], [4], [5]], np.array([0, 1, 0, 1, 1]), pad_id=0)
    keys = data.labels
    shares = np.array([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])
    mine = {"bias": torch.tensor([0.0, 10.0])}
    got = personal_models(model, data, keys, shares, {1: mine, 2: mine}, batch_size=2)
    p = torch.softmax(torch.log(torch.tensor([0.75, 0.25])) + mine["bias"], -1).double()
    assert got[1][0] == pytest.approx(0.75)
    assert got[1][1] == pytest.approx(float(-(0.25 * p[0].log() + 0.75 * p[1].log())))
    assert np.isnan(got[2][0]) and np.isnan(got[2][1])
    assert 0 not in got  # no personal model: nothing evaluated
    assert torch.equal(model.bias.detach(), torch.zeros(2))
    global_acc = personalised(evaluate(model, data, 2).accuracy_N, keys, shares)
    assert global_acc[1] == pytest.approx(0.25)
