"""FlexOlmo as a model family: transformers' MoE decoder from AllenAI, registered as a plugin.

Its MoE blocks already have the layout hfedmoe's expert interface reads (a ``gate`` router
returning logits, top-k weights and indices; ``experts`` holding 3-D tensors), so registering
the architecture is all it takes. Use it with ``plugins = ["examples.extending.flex_olmo"]``
and a local FlexOlmo checkpoint in ``model.name_or_path``.
"""

from transformers import AutoModelForCausalLM

from hfedmoe.model.hf import register_moe_family

register_moe_family("flex_olmo", AutoModelForCausalLM)
