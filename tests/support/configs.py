"""Tiny experiment configs and model directories the tests build (seconds-long runs)."""

from __future__ import annotations

import os
from pathlib import Path

from hfedmoe.foundation.assets import shipped_path

#: Where the tests' models train and evaluate: ``HFEDMOE_TEST_DEVICE=cuda pytest`` runs the
#: end-to-end runs and the expert interface's rules on a GPU (docs/TESTING.md).
TEST_DEVICE = os.environ.get("HFEDMOE_TEST_DEVICE", "cpu")


def save_tiny_model(directory: Path, make_model) -> Path:
    """Save ``make_model(vocab_size)`` (seeded) with the shipped MiniLM tokenizer to
    ``directory``, as a user's local model directory would be."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shipped_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    make_model(tokenizer.vocab_size).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_bert(vocab_size: int):
    """A randomly initialised 2-layer BERT encoder (hidden 32)."""
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )


def tiny_raw(model_dir: Path, **sections: dict) -> dict:
    """A raw config for a seconds-long run on the tiny model; ``sections`` override keys."""
    raw = {
        "name": "tiny",
        "seed": 0,
        "threads": 1,
        "model": {"name_or_path": str(model_dir), "num_experts": 4, "top_k": 2, "max_length": 32},
        "data": {"max_train_examples": 120, "max_test_examples": 40, "min_partition_size": 5},
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 2, "check_wire": True},
        "train": {"local_steps": 2, "batch_size": 8, "lr": 1e-3, "device": TEST_DEVICE},
        "eval": {"batch_size": 40},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw
