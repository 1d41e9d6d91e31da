"""What travels: the whole state for full fine-tuning; only trainable tensors over a frozen base,
which every party rebuilds identically from the public checkpoint and the seed."""

from __future__ import annotations

import pytest
import torch

from hfedmoe.federation.workload import client_model, label_names, server_workload
from hfedmoe.foundation.config import validate
from hfedmoe.model.state import has_frozen_base, load_shared_state, shared_state

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
