"""Models: MoE blocks, sparse upcycling, the classifier and its checkpoints."""

from hfedmoe.model.classifier import (
    build_classifier,
    load_checkpoint,
    load_tokenizer,
    save_checkpoint,
)
from hfedmoe.model.moe import ExpertFFN, MoEFeedForward
from hfedmoe.model.upcycle import moe_blocks, upcycle_bert

__all__ = [
    "ExpertFFN",
    "MoEFeedForward",
    "build_classifier",
    "load_checkpoint",
    "load_tokenizer",
    "moe_blocks",
    "save_checkpoint",
    "upcycle_bert",
]
