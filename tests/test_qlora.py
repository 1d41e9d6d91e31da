"""A quantised frozen base under LoRA (QLoRA-style, bitsandbytes on CPU): it trains, only the
adapters travel, the checkpoint reloads without bitsandbytes, and bad setups are clear errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

from hfedmoe.budget import build_cost_model
from hfedmoe.federation.workload import client_data, client_model, label_names, server_workload
from hfedmoe.foundation.config import load, validate
from hfedmoe.foundation.errors import ConfigError
from hfedmoe.model import load_checkpoint
from hfedmoe.model.quantize import is_quantized
from hfedmoe.results import read_metrics
from hfedmoe.training import evaluate, train_local

from .support.cli import run_cli
from .support.configs import save_tiny_model, tiny_raw

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def bert64_dir(tmp_path_factory) -> Path:
    """A tiny BERT whose layer sizes suit bitsandbytes' 4-bit CPU kernel (multiples of 64)."""
    from transformers import BertConfig, BertModel

    return save_tiny_model(
        tmp_path_factory.mktemp("bert64"),
        lambda vocab: BertModel(
            BertConfig(
                vocab_size=vocab,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                max_position_embeddings=64,
            )
        ),
    )


def _raw(model_dir: Path, quantize: str, **sections) -> dict:
    raw = tiny_raw(model_dir, **sections)
    raw["train"]["device"] = "cpu"  # a quantised base trains on the CPU only
    raw["model"]["lora"] = {"rank": 4, "targets": ["experts", "attention"], "quantize": quantize}
    return raw


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantised_base_trains_its_adapters(bert64_dir, kind):
    cfg = validate(_raw(bert64_dir, kind, train={"local_steps": 6, "lr": 5e-3}))
    model = client_model(cfg, label_names(cfg))
    assert is_quantized(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    result = train_local(model, client_data(cfg, 0, 2), cfg.train, np.random.default_rng(0))
    assert np.isfinite(result.mean_loss)
    assert result.expert_updates.sum() > 0  # LoRA slices of experts were trained


def test_quantisation_shrinks_the_resident_base(bert64_dir):
    fp32 = validate(_raw(bert64_dir, "nf4"))
    plain = fp32.model_copy(
        update={
            "model": fp32.model.model_copy(
                update={"lora": fp32.model.lora.model_copy(update={"quantize": None})}
            )
        }
    )
    quantised = build_cost_model(client_model(fp32, label_names(fp32)), fp32).resident_bytes
    full = build_cost_model(client_model(plain, label_names(plain)), plain).resident_bytes
    assert quantised < full


def test_qlora_federated_run_sends_only_adapters_and_reloads_without_quantisation(
    bert64_dir, tmp_path
):
    raw = _raw(bert64_dir, "nf4", algorithm="hfedmoe", federation={"rounds": 1})
    config = tmp_path / "qlora.toml"
    config.write_text(tomli_w.dumps(raw))
    run_dir = tmp_path / "run"
    proc = run_cli("run", str(config), "-o", str(run_dir), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    (record,) = read_metrics(run_dir)[1:]
    model = server_workload(load(config)).model
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    for c in record["clients"]:
        assert c["status"] == "ok" and 0 < c["bytes_down"] < full / 4
    reloaded, _ = load_checkpoint(run_dir / "model")
    assert not is_quantized(reloaded)  # the base is stored dequantised
    result = evaluate(reloaded, server_workload(load(config)).test, batch_size=16)
    assert result.accuracy == pytest.approx(record["test_accuracy"], abs=0.03)
    assert result.loss == pytest.approx(record["test_loss"], rel=1e-3)


def test_4bit_layers_of_the_wrong_size_are_a_clear_error(tiny_bert_dir):
    cfg = validate(_raw(tiny_bert_dir, "nf4"))  # hidden size 32
    with pytest.raises(ConfigError, match=r"multiples of 64; '.*' has 32 \(try quantize"):
        client_model(cfg, label_names(cfg))


def test_without_bitsandbytes_quantisation_says_what_is_needed(bert64_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    cfg = validate(_raw(bert64_dir, "nf4"))
    with pytest.raises(ConfigError, match=r"model.lora.quantize: needs the bitsandbytes package"):
        client_model(cfg, label_names(cfg))


def test_dequantised_checkpoint_predicts_what_the_quantised_model_predicts(bert64_dir, tmp_path):
    from hfedmoe.model import save_checkpoint

    cfg = validate(_raw(bert64_dir, "nf4"))
    task = server_workload(cfg)
    save_checkpoint(task.model, task.tokenizer, cfg.model, tmp_path / "ckpt", cfg.data.task)
    reloaded, _ = load_checkpoint(tmp_path / "ckpt")
    batch = task.test.batch(list(range(8)))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = task.model.eval()(**inputs).logits
        got = reloaded(**inputs).logits
    # the same up to the rounding of bitsandbytes' CPU kernel (measured 1.7e-4 here)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
