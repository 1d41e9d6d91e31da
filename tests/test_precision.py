"""Mixed precision (``train.precision = "bf16"`` or ``"fp16"``): the forward pass and the loss run
under autocast while the weights, their gradients and AdamW's moments stay fp32; fp16 scales the
loss and skips a step whose gradients overflow; a federated round of each kind of method trains
to finite weights; fp32 stays the default and the golden runs' own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.foundation.config import TrainConfig, validate
from hfedmoe.model import ExpertModel, build_classifier, load_tokenizer
from hfedmoe.model.moe_layers import expert_modules
from hfedmoe.results import read_metrics
from hfedmoe.training import train_local

from .support.configs import tiny_raw


def _local(tiny_bert_dir, precision: str, step_hooks=None):
    from hfedmoe.data.text import TextDataset
    from hfedmoe.data.tokenized import tokenize
    from hfedmoe.foundation.config import ModelConfig

    cfg = ModelConfig(name_or_path=str(tiny_bert_dir), num_experts=4, top_k=2)
    model = build_classifier(cfg, ("a", "b"), seed=0)
    texts = ["one two three", "four five", "six seven eight nine", "ten"] * 4
    rows = TextDataset(texts, np.array([0, 1, 1, 0] * 4), ("a", "b"))
    data = tokenize(rows, load_tokenizer(cfg), 16)
    train = TrainConfig(local_steps=3, batch_size=4, precision=precision)
    seen = []
    experts = list(expert_modules(ExpertModel(model).layers[0].block))
    hooks = [e.register_forward_hook(lambda m, a, out: seen.append(out.dtype)) for e in experts]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(model, data, train, np.random.default_rng(0), step_hooks)
    for hook in hooks:
        hook.remove()
    moved = any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())
    return model, result, seen, moved


def test_bf16_runs_the_forward_in_bf16_and_keeps_the_weights_fp32(tiny_bert_dir):
    model, result, seen, _ = _local(tiny_bert_dir, "bf16")
    assert set(seen) == {torch.bfloat16}  # every expert's output, under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(result.mean_loss)
    _, fp32, seen32, _ = _local(tiny_bert_dir, "fp32")
    assert set(seen32) == {torch.float32}
    # the same batches and start: close, not equal (bf16 keeps 8 bits of mantissa)
    assert result.mean_loss == pytest.approx(fp32.mean_loss, rel=0.05)
    assert result.mean_loss != fp32.mean_loss


def test_fp16_scales_the_loss_and_keeps_the_weights_fp32(tiny_bert_dir):
    model, result, seen, moved = _local(tiny_bert_dir, "fp16")
    assert set(seen) == {torch.float16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert moved and math.isfinite(result.mean_loss)
    assert result.expert_updates.sum() > 0
    _, fp32, _, _ = _local(tiny_bert_dir, "fp32")
    assert result.mean_loss == pytest.approx(fp32.mean_loss, rel=0.02)


def test_an_fp16_step_whose_gradients_overflow_is_skipped(tiny_bert_dir, monkeypatch):
    """A loss scale of 2^40 overflows fp16 in every backward pass: every step is skipped
    (nothing moves, no expert counts as updated), the hooks never see the infinite gradients,
    and the loss reported is the unscaled one."""
    from hfedmoe.training.loop import StepHooks

    class Watch(StepHooks):
        called = 0

        def after_backward(self, active_LE):
            Watch.called += 1

    scaler = torch.amp.GradScaler
    monkeypatch.setattr(
        torch.amp, "GradScaler", lambda *a, **k: scaler(*a, **{**k, "init_scale": 2.0**40})
    )
    _, result, _, moved = _local(tiny_bert_dir, "fp16", Watch())
    assert not moved and result.expert_updates.sum() == 0 and Watch.called == 0
    assert math.isfinite(result.mean_loss) and result.steps == 3


@pytest.mark.parametrize(
    "algorithm",
    # HFedMoE's run covers FedAvg's (autocast, the experts' own backward, masking): CI time
    [pytest.param("fedavg", marks=pytest.mark.slow), "hfedmoe"],
)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_federated_run_trains_to_finite_weights(
    tiny_bert_dir, tmp_path, algorithm, precision
):
    raw = tiny_raw(tiny_bert_dir, algorithm=algorithm, train={"precision": precision})
    run_embedded(validate(raw), str(tmp_path / "run"), server_app, client_app)
    records = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["test_loss"]) for r in records)
    assert records[-1]["clients_ok"] > 0 and records[-1]["clients_failed"] == 0


def test_the_cost_model_prices_the_activations_of_the_precision_trained(tiny_bert_dir):
    """A bf16 client's forward pass saves bf16 activations: the budget's prediction follows
    the config's precision instead of pricing every client at fp32."""
    from hfedmoe.budget.cost_model import build_cost_model

    saved = {}
    for precision in ("fp32", "bf16", "fp16"):
        cfg = validate(tiny_raw(tiny_bert_dir, train={"precision": precision}))
        model = build_classifier(cfg.model, ("a", "b", "c", "d", "e"), seed=0)
        saved[precision] = build_cost_model(model, cfg).activation_bytes
    assert 0 < saved["bf16"] == saved["fp16"] < saved["fp32"]


def test_activation_checkpointing_changes_no_value_and_keeps_fewer_activations(tiny_llama_dir):
    """train.activation_checkpointing recomputes each layer in the backward pass: the same loss
    and the same trained weights bit for bit (an upcycled decoder with backward-only masking),
    and the cost model prices the layers' inputs plus one layer, not every activation."""
    from hfedmoe.budget.cost_model import build_cost_model
    from hfedmoe.data.tokenized import TokenizedDataset
    from hfedmoe.model import build_causal_lm

    raw = tiny_raw(tiny_llama_dir, data={"task": "language-modeling"})
    results, costs = [], []
    for checkpointing in (False, True):
        cfg = validate(
            {**raw, "train": {**raw["train"], "activation_checkpointing": checkpointing}}
        )
        model = build_causal_lm(cfg.model, seed=0)
        ids = np.random.default_rng(0).integers(5, 100, size=(12, 24)).tolist()
        data = TokenizedDataset(ids, np.zeros(12, dtype=np.int64), 0, language_modeling=True)
        result = train_local(model, data, cfg.train, np.random.default_rng(0))
        results.append((result.mean_loss, model.state_dict()))
        costs.append(build_cost_model(model, cfg).activation_bytes)
        assert not model.is_gradient_checkpointing  # only while the client trains
    (loss, state), (loss_ckpt, state_ckpt) = results
    assert loss_ckpt == loss
    assert all(torch.equal(state_ckpt[k], v) for k, v in state.items())
    assert costs[1] < costs[0]
    # what checkpointing adds back: the largest of the 3 layers' activations, no more than all
    # of them and at least their mean
    from hfedmoe.budget.cost_model import probe_batch, saved_activation_bytes

    batch = probe_batch(model, cfg)
    full = saved_activation_bytes(model, batch)
    largest = saved_activation_bytes(model, batch, largest_layer=True)
    kept = saved_activation_bytes(model, batch, checkpointing=True)
    assert costs[1] == kept + largest and (full - kept) / 3 <= largest < full


def test_activation_checkpointing_on_a_model_without_it_is_a_config_error():
    from hfedmoe.foundation.errors import ConfigError
    from hfedmoe.training.loop import activation_checkpointing

    error = r"train\.activation_checkpointing: model type 'Linear'"
    with pytest.raises(ConfigError, match=error), activation_checkpointing(nn.Linear(2, 2), True):
        pass


@pytest.mark.parametrize(
    "algorithm",
    # FFT-MoE's router hooks feed a loss from inside the checkpointed layers; FLUX probes
    # experts after the backward pass (CI time: HFedMoE and FLEX-MoE were checked alike once)
    ["fftmoe", pytest.param("flux", marks=pytest.mark.slow)],
)
def test_a_federated_run_is_the_same_with_activation_checkpointing(
    tiny_bert_dir, tmp_path, algorithm
):
    records = []
    for checkpointing in (False, True):
        raw = tiny_raw(tiny_bert_dir, algorithm=algorithm)
        raw["train"]["activation_checkpointing"] = checkpointing
        run_embedded(validate(raw), str(tmp_path / str(checkpointing)), server_app, client_app)
        records.append(
            [
                (r["test_loss"], r["test_accuracy"])
                for r in read_metrics(tmp_path / str(checkpointing))
            ]
        )
    assert records[0] == records[1]


def _lora_llama_cfg(tiny_llama_dir, frozen_dtype: str):
    from hfedmoe.foundation.config import LoraConfig, ModelConfig

    return ModelConfig(
        name_or_path=str(tiny_llama_dir),
        num_experts=4,
        top_k=2,
        lora=LoraConfig(rank=4),
        frozen_dtype=frozen_dtype,
    )


def _lora_llama(tiny_llama_dir, frozen_dtype: str):
    from hfedmoe.model import build_model

    return build_model(_lora_llama_cfg(tiny_llama_dir, frozen_dtype), "language-modeling", seed=0)


def test_a_bf16_frozen_base_holds_2_bytes_per_frozen_parameter_and_trains_in_fp32(
    tiny_llama_dir,
):
    """model.frozen_dtype = "bf16": every frozen matrix (the base under LoRA, the tied
    embedding and head once) in bf16, frozen norms and every trainable tensor fp32, what travels
    fp32; the forward pass runs under bf16 autocast without the caller asking, with an fp32
    residual stream, close to what bf16 autocast on the fp32 base computes."""
    from hfedmoe.model.state import held_bytes, shared_state

    fp32, bf16 = _lora_llama(tiny_llama_dir, "fp32"), _lora_llama(tiny_llama_dir, "bf16")
    matrices = [p for p in fp32.parameters() if not p.requires_grad and p.dim() >= 2]
    assert held_bytes(fp32) - held_bytes(bf16) == 2 * sum(p.numel() for p in matrices)
    frozen = [p for p in bf16.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen if p.dim() >= 2} == {torch.bfloat16}
    assert {p.dtype for p in frozen if p.dim() < 2} == {torch.float32}  # the norms
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}
    assert {t.dtype for t in shared_state(bf16).values()} == {torch.float32}
    stream = []
    layer = bf16.get_base_model().model.layers[1]
    hook = layer.register_forward_pre_hook(lambda m, args: stream.append(args[0].dtype))
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = fp32(input_ids=ids).logits, bf16(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = fp32(input_ids=ids).logits
    hook.remove()
    assert stream == [torch.float32]
    assert got.dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu")
    scale = want.abs().max().item()
    assert torch.allclose(got.float(), want, atol=0.02 * scale)
    assert torch.allclose(got.float(), autocast.float(), atol=0.01 * scale)


def test_a_bf16_frozen_base_trains_its_adapters_and_never_moves(tiny_llama_dir):
    from hfedmoe.data.tokenized import TokenizedDataset

    model = _lora_llama(tiny_llama_dir, "bf16")
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = np.random.default_rng(0).integers(5, 100, size=(12, 24)).tolist()
    data = TokenizedDataset(ids, np.zeros(12, dtype=np.int64), 0, language_modeling=True)
    train = TrainConfig(local_steps=3, batch_size=4, lr=1e-2, precision="bf16")
    result = train_local(model, data, train, np.random.default_rng(0))
    assert math.isfinite(result.mean_loss)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert any(not torch.equal(params[n], p) for n, p in trained.items())
    assert all(params[n].dtype == torch.float32 for n in trained)


def test_a_bf16_base_leaves_autocast_when_its_forward_pass_raises(tiny_llama_dir):
    model = _lora_llama(tiny_llama_dir, "bf16")
    with pytest.raises(Exception):  # noqa: B017 - whatever the model raises for a bad input
        model(input_ids=torch.full((1, 4), 10**6))
    assert not torch.is_autocast_enabled("cpu")


def test_two_models_of_one_recipe_share_one_bf16_base(tiny_llama_dir):
    """The server's and a resident client's model: one bf16 base between them."""
    from hfedmoe.model.state import share_frozen_base

    a, b = _lora_llama(tiny_llama_dir, "bf16"), _lora_llama(tiny_llama_dir, "bf16")
    share_frozen_base(a, "bf16-recipe")
    frozen = [p for p in a.parameters() if not p.requires_grad]
    assert share_frozen_base(b, "bf16-recipe") == sum(p.numel() * p.element_size() for p in frozen)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert all(pa[n].data_ptr() == p.data_ptr() for n, p in pb.items() if not p.requires_grad)


def test_the_cost_model_prices_a_bf16_base_at_2_bytes_a_parameter(tiny_bert_dir):
    from hfedmoe.budget.cost_model import build_cost_model

    resident = {}
    for frozen_dtype in ("fp32", "bf16"):
        raw = tiny_raw(
            tiny_bert_dir,
            model={"lora": {"rank": 4}, "frozen_dtype": frozen_dtype},
            train={"precision": "bf16"},
        )
        cfg = validate(raw)
        model = build_classifier(cfg.model, ("a", "b"), seed=0)
        if frozen_dtype == "bf16":
            from hfedmoe.model.frozen import hold_frozen_in

            hold_frozen_in(model)
        resident[frozen_dtype] = build_cost_model(model, cfg).resident_bytes
        frozen = [p for p in model.parameters() if not p.requires_grad and p.dim() >= 2]
    assert resident["fp32"] - resident["bf16"] == 2 * sum(p.numel() for p in frozen)


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"model": {"frozen_dtype": "bf16"}}, r"model\.frozen_dtype: 'bf16' applies to a frozen"),
        (
            {"model": {"frozen_dtype": "bf16", "lora": {}}, "train": {"precision": "fp32"}},
            r"train\.precision: 'fp32' with model\.frozen_dtype = 'bf16'.*expected 'bf16'",
        ),
    ],
)
def test_a_bf16_base_needs_a_frozen_base_and_bf16_autocast(tiny_bert_dir, settings, error):
    from hfedmoe.foundation.errors import ConfigError

    with pytest.raises(ConfigError, match=error):
        validate(tiny_raw(tiny_bert_dir, **settings))


@pytest.mark.parametrize(
    ("algorithm", "model"),
    [
        ("hfedmoe", {"lora": {"rank": 4}}),  # LoRA on a bf16 base, HFedMoE's extra passes
        ("fftmoe", {}),  # FFT-MoE's dense parent in bf16 under its MoE adapters
        pytest.param("flux", {"lora": {"rank": 4}}, marks=pytest.mark.slow),
        pytest.param("flexmoe", {"lora": {"rank": 4}}, marks=pytest.mark.slow),
    ],
)
def test_a_federated_run_on_a_bf16_frozen_base_trains_to_finite_weights(
    tiny_bert_dir, tmp_path, algorithm, model
):
    raw = tiny_raw(
        tiny_bert_dir,
        algorithm=algorithm,
        model={**model, "frozen_dtype": "bf16"},
        train={"precision": "bf16"},
    )
    run_embedded(validate(raw), str(tmp_path / "run"), server_app, client_app)
    records = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["test_loss"]) for r in records)
    assert records[-1]["clients_ok"] > 0 and records[-1]["clients_failed"] == 0


def test_a_checkpoint_of_a_bf16_base_loads_as_it_was_saved(tiny_llama_dir, tmp_path):
    from hfedmoe.model import load_checkpoint, load_tokenizer, save_checkpoint

    model = _lora_llama(tiny_llama_dir, "bf16")
    cfg = _lora_llama_cfg(tiny_llama_dir, "bf16")
    save_checkpoint(model, load_tokenizer(cfg), cfg, tmp_path / "ckpt", "language-modeling")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    saved, back = model.state_dict(), loaded.state_dict()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in saved.items())
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
