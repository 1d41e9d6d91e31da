"""Models: MoE blocks, sparse upcycling, native MoE families, LoRA, the expert interface and
checkpoints. :func:`build_model` is the entry point."""

from hfedmoe.model.checkpoint import load_checkpoint, save_checkpoint
from hfedmoe.model.experts import ExpertModel
from hfedmoe.model.factory import build_model
from hfedmoe.model.moe import ExpertFFN, GatedExpertFFN, MoEFeedForward
from hfedmoe.model.upcycle import moe_blocks, upcycle
from hfedmoe.model.upcycled import build_causal_lm, build_classifier, load_tokenizer

__all__ = [
    "ExpertFFN",
    "ExpertModel",
    "GatedExpertFFN",
    "MoEFeedForward",
    "build_causal_lm",
    "build_classifier",
    "build_model",
    "load_checkpoint",
    "load_tokenizer",
    "moe_blocks",
    "save_checkpoint",
    "upcycle",
]
