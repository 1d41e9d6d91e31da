"""Shared fixtures: tiny BERT and Llama checkpoints on disk and an experiment config that uses
them. Helpers that tests import live in ``tests/support``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# converted GGUF models are cached inside the (git-ignored) repository .cache/
os.environ.setdefault(
    "HFEDMOE_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "hfedmoe")
)

from hfedmoe.foundation.config import ExperimentConfig, validate

from .support.configs import save_tiny_model, tiny_bert, tiny_raw


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT encoder (hidden 32)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), tiny_bert)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 3-layer Llama decoder (hidden 32) with a tied LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_tiny_model(
        tmp_path_factory.mktemp("tiny-llama"),
        lambda vocab: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=True,
            )
        ),
    )


@pytest.fixture
def tiny_cfg(tiny_bert_dir: Path) -> ExperimentConfig:
    return validate(tiny_raw(tiny_bert_dir))
