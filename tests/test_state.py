"""What travels: the whole state for full fine-tuning; only trainable tensors over a frozen base,
which every party rebuilds identically from the public checkpoint and the seed."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from torch import nn

from hfedmoe.federation.workload import client_data, client_model, label_names, server_workload
from hfedmoe.foundation.config import validate
from hfedmoe.model import state
from hfedmoe.model.state import (
    has_frozen_base,
    load_shared_state,
    share_frozen_base,
    shared_state,
)
from hfedmoe.training import train_local

from .support.configs import tiny_raw
from .support.families import FAMILIES, build


def _lora(tiny_bert_dir):
    raw = tiny_raw(tiny_bert_dir)
    raw["model"]["lora"] = {"rank": 2, "targets": ["experts", "attention"]}
    return validate(raw)


def test_full_fine_tuning_shares_the_whole_state(tiny_cfg):
    model = server_workload(tiny_cfg).model
    assert not has_frozen_base(model)
    assert set(shared_state(model)) == set(model.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_native_families_have_no_frozen_base_without_lora(family):
    assert not has_frozen_base(build(family, seed=0))


def test_a_client_rebuilds_exactly_the_servers_frozen_base(tiny_bert_dir):
    cfg = _lora(tiny_bert_dir)
    server = server_workload(cfg).model
    client = client_model(cfg, label_names(cfg))
    frozen = {n: p for n, p in server.named_parameters() if not p.requires_grad}
    assert frozen
    client_params = dict(client.named_parameters())
    for name, p in frozen.items():
        torch.testing.assert_close(client_params[name], p, rtol=0, atol=0)
    shared = shared_state(server)
    assert set(shared) == {n for n, p in server.named_parameters() if p.requires_grad}
    assert sum(t.numel() for t in shared.values()) < 0.5 * sum(p.numel() for p in frozen.values())


def test_loading_demands_every_trainable_tensor_and_nothing_unknown(tiny_bert_dir):
    cfg = _lora(tiny_bert_dir)
    model = client_model(cfg, label_names(cfg))
    weights = {n: t.clone() + 1 for n, t in shared_state(model).items()}
    load_shared_state(model, weights)
    for name, t in shared_state(model).items():
        torch.testing.assert_close(t, weights[name])
    first = next(iter(weights))
    with pytest.raises(KeyError, match="lack 1 tensors"):
        load_shared_state(model, {n: t for n, t in weights.items() if n != first})
    with pytest.raises(KeyError, match="unknown tensors"):
        load_shared_state(model, {**weights, "nope": torch.zeros(1)})


def test_one_process_holds_a_frozen_base_once(tiny_bert_dir):
    """The server's model and a resident client model built in one process (a simulation)
    hold one frozen base: each frozen tensor is one storage, each model keeps its own Parameter
    objects and its own trainable tensors, and loading a client's weights leaves the base."""
    cfg = _lora(tiny_bert_dir)
    server = server_workload(cfg).model
    client = client_model(cfg, label_names(cfg))
    ours, theirs = dict(server.named_parameters()), dict(client.named_parameters())
    for name, p in ours.items():
        assert (p.data_ptr() == theirs[name].data_ptr()) == (not p.requires_grad), name
        assert p is not theirs[name]
    base = {n: p.detach().clone() for n, p in ours.items() if not p.requires_grad}
    load_shared_state(client, {n: t + 1 for n, t in shared_state(client).items()})
    result = train_local(client, client_data(cfg, 0, 2), cfg.train, np.random.default_rng(0))
    assert result.steps == cfg.train.local_steps
    assert all(torch.equal(ours[n], t) for n, t in base.items())  # as built, bit for bit
    assert all(ours[n].data_ptr() == theirs[n].data_ptr() for n in base)  # and still one


def test_a_base_is_shared_where_equal_and_freed_with_its_last_model():
    def model() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        m[0].requires_grad_(False)  # the frozen base: 16 + 4 floats
        return m

    first, same, other = model(), model(), model()
    with torch.no_grad():
        other[0].weight.add_(1)  # its bias still equals the first's
    assert share_frozen_base(first, "recipe") == 0  # the first keeps its own
    assert share_frozen_base(same, "recipe") == (16 + 4) * 4
    assert share_frozen_base(other, "recipe") == 4 * 4
    assert same[0].weight.data_ptr() == first[0].weight.data_ptr()
    assert other[0].weight.data_ptr() != first[0].weight.data_ptr()
    assert other[0].bias.data_ptr() == first[0].bias.data_ptr()
    assert same[1].weight.data_ptr() != first[1].weight.data_ptr()  # trainable: its own
    assert share_frozen_base(nn.Linear(2, 2), "full fine-tuning") == 0
    del first, same, other
    gc.collect()
    assert not dict(state._FROZEN_BASES["recipe"])  # nothing keeps a base alive
