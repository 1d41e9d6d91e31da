"""A quantised frozen base under LoRA (QLoRA-style), through bitsandbytes.

``[model.lora] quantize = "nf4" | "fp4" | "int8"`` replaces the base's linear layers by
bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` before the adapters are added, so the frozen
base takes 4 or 8 bits per weight while LoRA trains in fp32 on top (Dettmers et al., 2023).
What stays in full precision: the classification or LM head, the routers (their logits decide
routing), embeddings, norms, and experts stored as fused 3-D tensors (bitsandbytes quantises
only ``nn.Linear``).

The quantised base never travels (``hfedmoe.model.state``): every party quantises the same
public base itself. A checkpoint stores the base dequantised (:func:`dequantized_state`), so it
loads without bitsandbytes and predicts what the quantised model predicts.

Measured on this CPU (bitsandbytes 0.50.2): 4-bit layers need an input size that is a multiple
of 64 in inference, or bitsandbytes' CPU kernel fails; that is checked here with a clear error.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from hfedmoe.foundation.errors import ConfigError

KINDS = ("nf4", "fp4", "int8")
_SKIP = {"classifier", "score", "lm_head", "gate", "router"}  # module names kept in fp32


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "model.lora.quantize: needs the bitsandbytes package "
            "(pip install 'hfedmoe[qlora]', or quantize = null)"
        )


def quantize_base(model: nn.Module, kind: str) -> int:
    """Replace the base's ``nn.Linear`` layers by bitsandbytes ones in place; the count."""
    require_bitsandbytes()
    import bitsandbytes as bnb

    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name.rpartition(".")[2] not in _SKIP
    ]
    for name, linear in targets:
        if kind != "int8" and linear.in_features % 64:
            raise ConfigError(
                f"model.lora.quantize: 4-bit bitsandbytes on CPU needs input sizes that are "
                f"multiples of 64; '{name}' has {linear.in_features} (try quantize = \"int8\")"
            )
    for name, linear in targets:
        bias = linear.bias is not None
        weight = linear.weight.data
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False
            )
            q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=bias,
                compute_dtype=torch.float32,
                quant_type=kind,
            )
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=kind)
        if bias:
            q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q.to(weight.device))  # .to() quantises
    return len(targets)


def is_quantized(model: nn.Module) -> bool:
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) for m in model.modules())


def logical_numel(p: torch.Tensor) -> int:
    """Weights a tensor stands for (a packed 4-bit tensor holds two per byte)."""
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


@torch.no_grad()
def dequantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every quantised weight back in fp32 and bitsandbytes'
    quantisation state left out: the state of the same model without quantisation."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    state = model.state_dict()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, bnb.nn.Linear4bit):
            weight = F.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        elif isinstance(m, bnb.nn.Linear8bitLt):
            weight = m.weight.data.float() * m.weight.SCB.float().unsqueeze(1) / 127
        else:
            continue
        for key in [k for k in state if k.startswith(prefix + "weight.") or k == prefix + "SCB"]:
            del state[key]
        state[prefix + "weight"] = weight
    return state
