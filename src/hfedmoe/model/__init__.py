"""Models: MoE blocks, sparse upcycling, the classifier and its checkpoints."""

from hfedmoe.model.classifier import (
    build_causal_lm,
    build_classifier,
    load_checkpoint,
    load_tokenizer,
    save_checkpoint,
)
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.moe import ExpertFFN, MoEFeedForward
from hfedmoe.model.upcycle import moe_blocks, upcycle

__all__ = [
    "ExpertFFN",
    "ExpertModel",
    "MoEFeedForward",
    "build_causal_lm",
    "build_classifier",
    "load_checkpoint",
    "load_tokenizer",
    "moe_blocks",
    "save_checkpoint",
    "upcycle",
]
