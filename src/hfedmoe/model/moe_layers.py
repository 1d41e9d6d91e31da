"""Finding the MoE blocks of any supported model, and seeing each one uniformly
(:class:`MoELayer`): its router, its experts' weights and what of them trains.

Two storage layouts are supported, found by inspecting the model (no per-model code forks):

- *fused* (transformers 5.x Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3): the ``experts`` module
  holds 3-D tensors whose first dimension is the expert (``gate_up_proj[e]``);
- *modular* (Switch Transformers, hfedmoe's upcycled blocks): ``experts`` is a ModuleList or
  ModuleDict with one module per expert.

An MoE block is any module with an ``experts`` child and a router child (``gate`` returning
``(logits, weights, indices)``, or Switch's ``router`` returning ``(dispatch, probs, logits)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from hfedmoe.model.expert_axis import ExpertAxis

ExpertId = tuple[int, int]  # (MoE layer position 0..L-1, expert index 0..E-1)


@dataclass(frozen=True)
class RoutingRule:
    """How a router family turns logits into top-k choices (used to re-route in strict mode)."""

    score: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk: bool = True
    scaling: float = 1.0


@dataclass
class MoELayer:
    """One MoE block, seen uniformly.

    ``fused`` / ``modular`` hold the experts' weights (what the forward pass computes with);
    ``axes`` / ``trainable`` hold what is trained, read, written and sent per expert: the same
    weights, or, with LoRA, the experts' LoRA tensors (slices of PEFT's stacked LoRA for fused
    experts).
    """

    position: int  # 0..L-1 among the MoE layers
    name: str  # module path, e.g. "bert.encoder.layer.3.intermediate"
    block: nn.Module
    router: nn.Module
    kind: Literal["topk", "switch"]
    num_experts: int
    top_k: int
    rule: RoutingRule
    router_params: dict[str, nn.Parameter]  # state-dict name -> parameter
    fused: dict[str, nn.Parameter] = field(default_factory=dict)  # local name -> (E, ...) tensor
    modular: list[dict[str, nn.Parameter]] = field(default_factory=list)  # per expert
    axes: dict[str, tuple[nn.Parameter, ExpertAxis]] = field(default_factory=dict)
    trainable: list[dict[str, nn.Parameter]] = field(default_factory=list)  # modular, per expert
    expert_param_names: list[str] = field(default_factory=list)  # state-dict names
    #: the transformer block it sits in: its index in the nearest ModuleList above it (the
    #: model's list of blocks, whose order attention outputs follow); None if there is none
    transformer_block: int | None = None

    def weight_params(self, e: int) -> list[torch.Tensor]:
        """Expert ``e``'s weights (frozen or not), for FLOP counting."""
        if self.fused:
            return [p[e] for p in self.fused.values()]
        return [p for n, p in self.modular[e].items() if "lora_" not in n]


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE block of ``model`` in module order."""
    names = {id(p): n for n, p in model.named_parameters()}
    layers: list[MoELayer] = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        router = getattr(module, "gate", None)
        if router is None:
            router = getattr(module, "router", None)
        if not isinstance(experts, nn.Module) or not isinstance(router, nn.Module):
            continue
        wrapped_router, router = router, _unwrap_peft(router)
        kind: Literal["topk", "switch"] = "switch" if hasattr(router, "expert_capacity") else "topk"
        num_experts = int(router.num_experts)
        layer = MoELayer(
            position=len(layers),
            name=name,
            block=module,
            router=router,
            kind=kind,
            num_experts=num_experts,
            top_k=1 if kind == "switch" else int(router.top_k),
            rule=_routing_rule(router),
            router_params={names[id(p)]: p for p in wrapped_router.parameters()},
            transformer_block=_transformer_block(model, name),
        )
        layer.expert_param_names = [names[id(p)] for p in experts.parameters()]
        if isinstance(experts, nn.ModuleList | nn.ModuleDict):
            modules = list(expert_modules(module))
            layer.modular = [dict(m.named_parameters()) for m in modules]
            layer.trainable = [
                {n: p for n, p in params.items() if p.requires_grad} or params
                for params in layer.modular
            ]
        else:
            layer.fused = {
                n.split(".")[-1]: p
                for n, p in experts.named_parameters()
                if p.dim() >= 1 and p.shape[0] == num_experts and "lora_" not in n
            }
            layer.axes = _lora_axes(experts) or {
                n: (p, ExpertAxis.rows(num_experts)) for n, p in layer.fused.items()
            }
        layers.append(layer)
    return layers


def _transformer_block(model: nn.Module, name: str) -> int | None:
    """The index of module ``name`` in the nearest ``nn.ModuleList`` that holds it
    ("bert.encoder.layer.3.intermediate": 3 in ``bert.encoder.layer``), from the module tree."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[: i - 1])) if i > 1 else model
        holder = getattr(parent, parts[i - 1], None)
        if isinstance(holder, nn.ModuleList) and parts[i].isdigit():
            return int(parts[i])
    return None


def _unwrap_peft(module: nn.Module) -> nn.Module:
    """The module a PEFT LoRA wrapper (``base_layer`` + ``lora_A``) wraps, or ``module``."""
    while hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        module = module.base_layer
    return module


def _lora_axes(experts: nn.Module) -> dict[str, tuple[nn.Parameter, ExpertAxis]]:
    """PEFT LoRA on fused expert tensors (``target_parameters``): where each expert's rank-r
    slice lives. lora_A is (E*r, in): expert e owns rows e*r..e*r+r-1; lora_B is (out, E*r):
    expert e owns columns e, e+E, e+2E, ... (PEFT reshapes B to (out, r, E))."""
    axes: dict[str, tuple[nn.Parameter, ExpertAxis]] = {}
    for wrapper in experts.modules():
        if not (hasattr(wrapper, "parameter_name") and hasattr(wrapper, "lora_A")):
            continue
        for adapter in wrapper.lora_A:
            E, r = wrapper.num_experts, wrapper.r[adapter]
            a = wrapper.lora_A[adapter].weight
            b = wrapper.lora_B[adapter].weight
            name = wrapper.parameter_name
            axes[f"{name}.lora_A"] = (a, ExpertAxis(0, torch.arange(E * r) // r, E))
            axes[f"{name}.lora_B"] = (b, ExpertAxis(1, torch.arange(E * r) % E, E))
    return axes


def _routing_rule(router: nn.Module) -> RoutingRule:
    cls = type(router).__name__
    if cls.startswith("DeepseekV3"):
        return RoutingRule(
            "sigmoid", bool(router.norm_topk_prob), float(router.routed_scaling_factor)
        )
    if cls.startswith("DeepseekV2"):  # V2 never renormalises its top-k weights
        return RoutingRule("softmax", False, float(router.routed_scaling_factor))
    return RoutingRule("softmax", bool(getattr(router, "norm_topk_prob", True)))


def expert_modules(block: nn.Module) -> Iterator[nn.Module]:
    experts = block.experts
    yield from experts.values() if isinstance(experts, nn.ModuleDict) else experts
