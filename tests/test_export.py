"""`hfedmoe export`: a trained model out as a standard transformers model. The export of a
real run loads in a fresh process with plain transformers (hfedmoe never imported) and gives
hfedmoe's logits and generations; every parent the export takes maps exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hfedmoe.engines.embedded import run_embedded
from hfedmoe.federation.client_app import app as client_app
from hfedmoe.federation.server_app import app as server_app
from hfedmoe.foundation.config import ModelConfig, validate
from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.model.checkpoint import load_checkpoint
from hfedmoe.model.export import standard_model
from hfedmoe.model.factory import build_model

from .support import families
from .support.cli import invoke_cli
from .support.configs import save_tiny_model, tiny_raw

#: Run with plain transformers in a new process: logits of fixed ids and a greedy generation.
PLAIN = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(input_ids=ids).logits
    gen = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
assert not any(m.startswith("hfedmoe") for m in sys.modules), "hfedmoe was imported"
print(json.dumps({"class": type(model).__name__, "logits": logits.tolist(), "gen": gen.tolist()}))
"""

IDS = [[5, 17, 101, 7, 300, 44, 9, 12], [2, 8, 19, 250, 31, 6, 77, 150]]


def _plain(directory: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN, str(directory), json.dumps(IDS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ours(model) -> tuple[torch.Tensor, list]:
    ids = torch.tensor(IDS)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
        gen = model.generate(
            input_ids=ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    return logits, gen.tolist()


def test_an_exported_run_loads_and_generates_with_plain_transformers(tiny_llama_dir, tmp_path):
    raw = tiny_raw(
        tiny_llama_dir,
        algorithm="hfedmoe",
        data={"task": "language-modeling", "max_train_examples": 40, "max_test_examples": 8},
    )
    raw["model"].update(moe_layers=[1, 2], expert_noise_std=0.05)
    run_embedded(validate(raw), str(tmp_path / "run"), server_app, client_app)
    proc = invoke_cli("export", str(tmp_path / "run"), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "Qwen2MoeForCausalLM" in proc.stdout
    model, _ = load_checkpoint(tmp_path / "run" / "model")
    logits, gen = _ours(model)
    plain = _plain(tmp_path / "out")
    assert plain["class"] == "Qwen2MoeForCausalLM"
    assert torch.allclose(torch.tensor(plain["logits"]), logits, atol=1e-4)
    assert plain["gen"] == gen
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["mlp_only_layers"] == [0] and config["num_experts"] == 4  # layer 0 dense


def _tiny_parent(tmp_path: Path, kind: str) -> Path:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    config_class, model_class = classes[kind]
    size = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return save_tiny_model(
        tmp_path / kind,
        lambda vocab: model_class(
            config_class(vocab_size=vocab, **size, tie_word_embeddings=False)
        ),
    )


@pytest.mark.parametrize("parent", ["llama", "mistral", "qwen2"])
def test_every_upcycled_parent_maps_exactly_onto_qwen2_moe(parent, tmp_path):
    directory = _tiny_parent(tmp_path, parent)
    cfg = ModelConfig(
        name_or_path=str(directory),
        num_experts=4,
        top_k=2,
        moe_layers=[0, 2],
        expert_noise_std=0.1,
    )
    model = build_model(cfg, "language-modeling", [], seed=0).eval()
    if parent == "qwen2":  # its query/key/value biases must survive
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_()
    exported = standard_model(model)
    assert type(exported).__name__ == "Qwen2MoeForCausalLM"
    assert exported.config.mlp_only_layers == [1]
    ids = torch.tensor(IDS)
    with torch.no_grad():
        assert torch.allclose(
            exported(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5
        )


@pytest.mark.parametrize("frozen_dtype", ["fp32", "bf16"])
def test_a_lora_run_exports_its_adapters_merged(tiny_llama_dir, frozen_dtype):
    """On a bf16 base (model.frozen_dtype) the export widens the base to fp32 (exactly) before
    the adapters merge into it, so the exported model is fp32 and computes what the run
    computed under bf16 autocast up to bf16's rounding: close, not equal."""
    cfg = ModelConfig(
        name_or_path=str(tiny_llama_dir),
        num_experts=4,
        top_k=2,
        moe_layers=[1, 2],
        lora={"rank": 4, "alpha": 8, "targets": ["experts", "attention"]},
        frozen_dtype=frozen_dtype,
    )
    model = build_model(cfg, "language-modeling", [], seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained adapters: B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=g)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits
        exported = standard_model(model)
        after = exported(input_ids=ids).logits
    assert type(exported).__name__ == "Qwen2MoeForCausalLM"
    assert not any("lora" in n for n, _ in exported.named_parameters())
    if frozen_dtype == "fp32":
        assert torch.allclose(after, before, atol=1e-5)
    else:
        assert after.dtype == torch.float32 and before.dtype == torch.bfloat16
        assert {p.dtype for p in exported.parameters()} == {torch.float32}
        error = (after - before.float()).abs().max() / before.abs().max().float()
        assert error < 0.05, error


def test_a_native_moe_exports_as_its_own_architecture(tmp_path):
    model = families.build("mixtral").eval()
    exported = standard_model(model)
    assert exported is model  # already a transformers class: saved as it is


#: the custom-code classifier in a new process: plain transformers with trust_remote_code
PLAIN_CLASSIFIER = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True)
with torch.no_grad():
    logits = model.eval()(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits
assert not any(m.startswith("hfedmoe") for m in sys.modules), "hfedmoe was imported"
print(json.dumps({"class": type(model).__name__, "labels": model.config.id2label,
                  "logits": logits.tolist()}))
"""


def test_an_encoder_classifier_exports_as_custom_code(tiny_bert_dir, tmp_path):
    raw = tiny_raw(tiny_bert_dir, algorithm="hfedmoe")
    raw["federation"]["rounds"] = 1
    run_embedded(validate(raw), str(tmp_path / "run"), server_app, client_app)
    proc = invoke_cli("export", str(tmp_path / "run" / "model"), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == (
        "modeling_hfedmoe_bert.HFedMoEBertForSequenceClassification"
    )
    assert (tmp_path / "out" / "modeling_hfedmoe_bert.py").is_file()
    ids = [[101, 2023, 2003, 1037, 3231, 102]]
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_CLASSIFIER, str(tmp_path / "out"), json.dumps(ids)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the repository: hfedmoe must not be importable by accident
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    result = json.loads(plain.stdout.strip().splitlines()[-1])
    model, _ = load_checkpoint(tmp_path / "run" / "model")
    with torch.no_grad():
        ours = model(input_ids=torch.tensor(ids)).logits
    assert result["class"] == "HFedMoEBertForSequenceClassification"
    assert list(result["labels"].values()) == [model.config.id2label[i] for i in range(5)]
    assert torch.allclose(torch.tensor(result["logits"]), ours, atol=1e-5)


def test_fftmoe_adapters_are_refused_in_one_line(tiny_bert_dir, tmp_path):
    raw = tiny_raw(tiny_bert_dir, algorithm="fftmoe")
    raw["federation"]["rounds"] = 1
    run_embedded(validate(raw), str(tmp_path / "run"), server_app, client_app)
    proc = invoke_cli("export", str(tmp_path / "run"), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hfedmoe: error: export: FFT-MoE's MoE adapters have no standard architecture"
    ]
    assert not (tmp_path / "out").exists()


def test_export_never_writes_into_a_directory_that_holds_files(tiny_llama_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(HFedMoEError, match="already holds files"):
        from hfedmoe.model.export import export_model

        export_model(tmp_path / "nowhere", tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
