"""The expert interface: one view of the expert pool of any supported MoE model.

METHOD.md §1: the pool is E = {E_(l,e)}, L MoE layers x E experts each, with one router (gating
network) per MoE layer; every other parameter (embeddings, attention, norms, heads, shared
experts) is *shared*. Algorithms see models only through :class:`ExpertModel`.

Shape legend: B samples, T tokens per sample, N tokens in a layer's stream (B*T), E experts per
layer, K experts per token, L MoE layers.

Two storage layouts are supported, found by inspecting the model (no per-model code forks):

- *fused* (transformers 5.x Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3): the ``experts`` module
  holds 3-D tensors whose first dimension is the expert (``gate_up_proj[e]``);
- *modular* (Switch Transformers, hfedmoe's upcycled blocks): ``experts`` is a ModuleList or
  ModuleDict with one module per expert.

An MoE block is any module with an ``experts`` child and a router child (``gate`` returning
``(logits, weights, indices)``, or Switch's ``router`` returning ``(dispatch, probs, logits)``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.model.expert_axis import ExpertAxis
from hfedmoe.model.quantize import logical_numel

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


def lean_forward(model: nn.Module, logits_to_keep: int = 1) -> dict[str, object]:
    """Keyword arguments that spare a forward pass the work its caller never reads: logits at
    the last ``logits_to_keep`` positions only, and no key/value cache. A causal LM's logits are
    the largest tensor of an inference pass (SmolLM2: 32 x 96 positions x 49,152 words = 604 MB
    a batch, and a fifth of its compute), so a pass that reads only the routers keeps one.

    Empty for a model whose forward takes neither (encoders, Switch): it computes as before.
    A PEFT model passes them on to the model it wraps.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(base.forward).parameters
    options: dict[str, object] = {}
    if "logits_to_keep" in accepted:
        options["logits_to_keep"] = logits_to_keep
    if "use_cache" in accepted:
        options["use_cache"] = False
    return options


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


# ---- routing capture ------------------------------------------------------------------


@dataclass
class _Record:
    logits_NE: torch.Tensor
    chosen_NE: torch.Tensor  # bool: token n was sent to expert e


class RoutingCapture:
    """Records, for every MoE layer, the router logits and routing decisions of a forward pass.

    Use as ``with em.capture() as cap: model(**batch)``, then :meth:`sample_probs` and
    :meth:`routed`. Hooks are removed on exit.
    """

    def __init__(self, layers: list[MoELayer]):
        self.layers = layers
        self.records: dict[int, _Record] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> RoutingCapture:
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: MoELayer):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            if layer.kind == "switch":
                dispatch, _, logits = output
                chosen = dispatch.reshape(-1, layer.num_experts).bool()
            else:
                logits, _, indices = output
                chosen = torch.zeros(
                    logits.shape[0], layer.num_experts, dtype=torch.bool, device=logits.device
                )
                chosen.scatter_(1, indices.reshape(logits.shape[0], -1), True)
            # on the CPU: (tokens, E) is small, and selection code then never meets a device
            self.records[layer.position] = _Record(
                logits.detach().reshape(-1, layer.num_experts).cpu(), chosen.detach().cpu()
            )

        return hook

    def _per_sample(self, x_NE: torch.Tensor, mask_BT: torch.Tensor | None) -> tuple:
        """View (N, E) as (B, T, E) with a (B, T) real-token mask (on the CPU, as the records)."""
        mask_BT = None if mask_BT is None else mask_BT.cpu()
        if mask_BT is not None and x_NE.shape[0] == mask_BT.numel():
            B, T = mask_BT.shape
            return x_NE.reshape(B, T, -1), mask_BT.bool()
        if mask_BT is not None and x_NE.shape[0] % mask_BT.shape[0] == 0:
            # another token stream (e.g. a seq2seq decoder): every token counts
            B = mask_BT.shape[0]
            x = x_NE.reshape(B, x_NE.shape[0] // B, -1)
            return x, torch.ones(x.shape[:2], dtype=torch.bool)
        return x_NE.unsqueeze(0), torch.ones(1, x_NE.shape[0], dtype=torch.bool)

    def sample_probs(
        self, attention_mask: torch.Tensor | None, reduce: Literal["mean", "max"] = "mean"
    ) -> torch.Tensor:
        """G_e(x_i): per-sample router probabilities, (L, B, E).

        The full softmax over all E experts of each token, reduced over the sample's real
        (non-padding) tokens by mean (METHOD.md §7 default) or max.
        """
        out = []
        for layer in self.layers:
            probs_NE = torch.softmax(self.records[layer.position].logits_NE.float(), dim=-1)
            probs_BTE, real_BT = self._per_sample(probs_NE, attention_mask)
            if reduce == "mean":
                weights = real_BT.unsqueeze(-1).to(probs_BTE.dtype)
                out.append((probs_BTE * weights).sum(1) / weights.sum(1).clamp_min(1))
            else:
                out.append(probs_BTE.masked_fill(~real_BT.unsqueeze(-1), 0).amax(1))
        return torch.stack(out)

    def tokens(
        self, attention_mask: torch.Tensor | None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per MoE layer, the real (non-padding) tokens' router probabilities (N, E) (softmax
        over all experts), top-k choices (N, E) bool, and the sample each token is of (N,)."""
        out = []
        for layer in self.layers:
            record = self.records[layer.position]
            probs_BTE, real_BT = self._per_sample(
                torch.softmax(record.logits_NE.float(), dim=-1), attention_mask
            )
            chosen_BTE, _ = self._per_sample(record.chosen_NE, attention_mask)
            B, T = real_BT.shape
            sample_BT = torch.arange(B)[:, None].expand(B, T)
            out.append((probs_BTE[real_BT], chosen_BTE[real_BT], sample_BT[real_BT]))
        return out

    def routed(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """E_union: (L, E) bool, experts that top-k routing sent at least one real token to."""
        out = []
        for layer in self.layers:
            chosen_BTE, real_BT = self._per_sample(
                self.records[layer.position].chosen_NE, attention_mask
            )
            out.append((chosen_BTE & real_BT.unsqueeze(-1)).flatten(0, 1).any(0))
        return torch.stack(out)


# ---- the interface --------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertEntry:
    """Where an expert's tensor lives in a state dict: the whole entry, or positions ``index``
    along ``dim`` of it (a fused tensor or a stacked LoRA).

    The one way to address an expert: the server's aggregation, a client's partial downloads
    and uploads, the cost model and :meth:`ExpertModel.read_expert` all go through it.
    """

    state_name: str
    dim: int | None = None
    index: torch.Tensor | None = None
    #: the tensor's name within its expert, the same for every expert of a layer ("fc_in.weight",
    #: "gate_up_proj", "gate_up_proj.lora_A"); "" = ``state_name``
    name: str = ""

    @property
    def local_name(self) -> str:
        return self.name or self.state_name

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This expert's part of ``tensor``: the tensor itself for a whole entry, a view of it
        where the expert's positions are contiguous (a fused row, a LoRA's rank slice), else a
        copy. Callers that keep or change the part clone it."""
        if self.dim is None:
            return tensor
        index = self.index
        start, length = int(index[0]), len(index)
        if int(index[-1]) - start + 1 == length and bool((index.diff() == 1).all()):
            return tensor.narrow(self.dim, start, length)
        return tensor.index_select(self.dim, index.to(tensor.device))

    def write_(self, tensor: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """Replace this expert's part of ``tensor`` in place; returns ``tensor``."""
        part = part.to(tensor.device, tensor.dtype)
        if self.dim is None:
            return tensor.copy_(part)
        return tensor.index_copy_(self.dim, self.index.to(tensor.device), part)


@dataclass(frozen=True)
class ParamBytes:
    """Parameter bytes of the three groups (METHOD.md §6 cost model inputs)."""

    per_expert: tuple[int, ...]  # one entry per MoE layer: bytes of one expert of that layer
    routers: int
    shared: int
    num_experts: int  # E, experts per layer

    @property
    def experts(self) -> int:
        """Bytes of the whole expert pool."""
        return sum(self.per_expert) * self.num_experts


class ExpertModel:
    """A model seen as shared parameters + routers + an (L x E) pool of experts."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = find_moe_layers(model)
        if not self.layers:
            raise HFedMoEError(
                f"model: no MoE layers found in {type(model).__name__} "
                "(expected modules with `experts` and a `gate`/`router`)"
            )
        self.num_experts = self.layers[0].num_experts
        if any(layer.num_experts != self.num_experts for layer in self.layers):
            raise HFedMoEError("model: MoE layers with different expert counts are not supported")

    # -- the pool and the parameter groups --
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def shape(self) -> tuple[int, int]:
        """(L, E)."""
        return self.num_layers, self.num_experts

    def experts(self) -> list[ExpertId]:
        return [(layer.position, e) for layer in self.layers for e in range(layer.num_experts)]

    def param_groups(self) -> dict[str, list[str]]:
        """State-dict names of the parameters in each group: experts, routers, shared."""
        expert = {n for layer in self.layers for n in layer.expert_param_names}
        router = {n for layer in self.layers for n in layer.router_params}
        groups: dict[str, list[str]] = {"experts": [], "routers": [], "shared": []}
        for name, _ in self.model.named_parameters():
            key = "experts" if name in expert else "routers" if name in router else "shared"
            groups[key].append(name)
        return groups

    # -- routing --
    def capture(self) -> RoutingCapture:
        return RoutingCapture(self.layers)

    @contextlib.contextmanager
    def restrict_routing(self, allowed_LE: torch.Tensor) -> Iterator[None]:
        """Strict mode: tokens are routed only among ``allowed_LE`` experts of each layer.

        The router's own logits are kept; its top-k choice is redone among the allowed experts
        with the family's scoring rule (group-limited selection of DeepSeek is not applied).
        """
        allowed_LE = allowed_LE.bool()
        if allowed_LE.shape != self.shape or not allowed_LE.any(1).all():
            raise ValueError(f"allowed mask must be {self.shape} with >= 1 expert per layer")
        handles = [
            layer.router.register_forward_hook(_strict_hook(layer, allowed_LE[layer.position]))
            for layer in self.layers
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # -- updates --
    @contextlib.contextmanager
    def update_only(self, active_LE: torch.Tensor) -> Iterator[None]:
        """Around ``loss.backward()``: experts outside ``active_LE`` skip their weight gradients.

        Effective for experts that support it (hfedmoe's upcycled experts, which read a
        ``trainable`` flag during the backward pass): the backward pass then really shrinks.
        Other experts still compute their gradients; :meth:`expert_grad_mask` drops them.
        """
        flagged = []
        for layer in self.layers:
            if layer.modular:
                experts = list(expert_modules(layer.block))
                for e, module in enumerate(experts):
                    if hasattr(module, "trainable") and not active_LE[layer.position, e]:
                        module.trainable = False
                        flagged.append(module)
        try:
            yield
        finally:
            for module in flagged:
                module.trainable = True

    def expert_grad_mask(self, active_LE: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """Backward-only restriction: drop the gradients of experts outside ``active_LE``.

        Modular experts: their ``grad`` becomes None (the optimizer then skips them entirely).
        Fused experts: the inactive experts' gradient entries are zeroed and the returned
        {parameter: (E,) bool} masks must be passed to the optimizer
        (:class:`hfedmoe.training.MaskedAdamW`) so that their values and moments do not move
        either (METHOD.md §7).
        """
        active: dict[nn.Parameter, torch.Tensor] = {}
        for layer in self.layers:
            active_E = active_LE[layer.position].bool()
            for p, axis in layer.axes.values():
                if p.grad is not None:
                    p.grad.index_fill_(axis.dim, axis.positions(~active_E).to(p.device), 0)
                active[p] = active_E.clone()
            for e, params in enumerate(layer.trainable):
                if not active_E[e]:
                    for p in params.values():
                        p.grad = None
        return active

    def expert_axes(self) -> dict[nn.Parameter, ExpertAxis]:
        """The fused tensors whose experts an optimizer must be able to mask, and where."""
        return {p: axis for layer in self.layers for p, axis in layer.axes.values()}

    # -- where experts and routers live in a state dict (for aggregation on the server) --
    def expert_entries(self) -> dict[ExpertId, list[ExpertEntry]]:
        """For every expert, the state-dict entries (or slices of them) holding its trainable
        tensors: what a server averages per expert."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        out: dict[ExpertId, list[ExpertEntry]] = {}
        for layer in self.layers:
            for e in range(layer.num_experts):
                if layer.axes:
                    out[(layer.position, e)] = [
                        ExpertEntry(names[id(p)], axis.dim, axis.positions_of(e), name=n)
                        for n, (p, axis) in layer.axes.items()
                    ]
                else:
                    out[(layer.position, e)] = [
                        ExpertEntry(names[id(p)], name=n) for n, p in layer.trainable[e].items()
                    ]
        return out

    def router_entries(self) -> dict[int, list[str]]:
        """For every MoE layer, the state-dict names of its router's trainable parameters."""
        return {
            layer.position: [n for n, p in layer.router_params.items() if p.requires_grad]
            for layer in self.layers
        }

    # -- reading and writing one expert (through its ExpertEntry list) --
    def read_expert(self, expert: ExpertId) -> dict[str, torch.Tensor]:
        """Expert ``(layer, e)``'s trainable tensors (its weights, or its LoRA slices), copied,
        by their names within the expert (the same for every expert of a layer)."""
        params = dict(self.model.named_parameters())
        return {
            x.local_name: x.take(params[x.state_name].detach()).clone()
            for x in self._entries(expert)
        }

    @torch.no_grad()
    def write_expert(self, expert: ExpertId, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite expert ``(layer, e)``'s trainable tensors; nothing else changes."""
        entries = self._entries(expert)
        params = dict(self.model.named_parameters())
        targets = {x.local_name: x for x in entries}
        if set(tensors) != set(targets):
            raise KeyError(
                f"expert {expert}: expected tensors {sorted(targets)}, got {sorted(tensors)}"
            )
        for n, x in targets.items():
            shape = x.take(params[x.state_name]).shape
            if tensors[n].shape != shape:
                raise ValueError(
                    f"expert {expert}.{n}: shape {tuple(tensors[n].shape)} != {tuple(shape)}"
                )
        for n, x in targets.items():
            x.write_(params[x.state_name].data, tensors[n])

    def _entries(self, expert: ExpertId) -> list[ExpertEntry]:
        position, e = expert
        if not (0 <= position < self.num_layers and 0 <= e < self.num_experts):
            raise IndexError(f"expert {expert} outside the {self.shape} pool")
        return self.expert_entries()[expert]

    # -- cost accounting (inputs of the budget cost model, METHOD.md §6) --
    def param_bytes(self) -> ParamBytes:
        groups = self.param_groups()
        sizes = dict(self.model.named_parameters())

        def nbytes(names: list[str]) -> int:
            return sum(sizes[n].numel() * sizes[n].element_size() for n in names)

        per_expert = tuple(
            sum(t.numel() * t.element_size() for t in layer.weight_params(0))
            for layer in self.layers
        )
        return ParamBytes(
            per_expert, nbytes(groups["routers"]), nbytes(groups["shared"]), self.num_experts
        )

    def flops_per_token(self, active_LE: torch.Tensor | None = None) -> tuple[float, float]:
        """(forward, backward) matmul FLOPs per token; ``active_LE`` = experts being trained.

        Counts 2 FLOPs per weight per token for the forward pass (attention's score products
        are not counted: they depend on the sequence length). Backward: gradients with respect
        to activations cost as much as the forward pass; gradients with respect to weights cost
        the same again, but only for trainable weights: the shared and router weights that are
        not frozen (a frozen base computes none), and each
        layer's routed expert work in proportion |active_l| / E (tokens spread evenly over
        experts). Embedding lookups are not matmuls and are excluded; an output head tied to the
        embedding is a matmul and is counted.
        """
        L, E = self.shape
        active_LE = torch.ones(L, E, dtype=torch.bool) if active_LE is None else active_LE.bool()
        groups = self.param_groups()
        sizes = dict(self.model.named_parameters())
        lookups = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Embedding)}
        matmuls = [
            sizes[n]
            for n in groups["shared"]
            if sizes[n].dim() >= 2 and id(sizes[n]) not in lookups
        ]
        head = getattr(self.model, "get_output_embeddings", lambda: None)()
        if head is not None and id(head.weight) in lookups:  # an LM head tied to the embedding
            matmuls.append(head.weight)
        shared = sum(logical_numel(w) for w in matmuls)
        shared_trained = sum(logical_numel(w) for w in matmuls if w.requires_grad)
        routers = sum(sizes[n].numel() for n in groups["routers"])
        routers_trained = sum(sizes[n].numel() for n in groups["routers"] if sizes[n].requires_grad)
        expert_params = [
            sum(logical_numel(t) for t in layer.weight_params(0) if t.dim() >= 2)
            for layer in self.layers
        ]
        routed = sum(layer.top_k * p for layer, p in zip(self.layers, expert_params, strict=True))
        trained_routed = sum(
            layer.top_k * p * float(active_LE[layer.position].float().mean())
            for layer, p in zip(self.layers, expert_params, strict=True)
        )
        forward = 2.0 * (shared + routers + routed)
        backward = forward + 2.0 * (shared_trained + routers_trained + trained_routed)
        return forward, backward


def expert_modules(block: nn.Module) -> Iterator[nn.Module]:
    experts = block.experts
    yield from experts.values() if isinstance(experts, nn.ModuleDict) else experts


def _strict_hook(layer: MoELayer, allowed_E: torch.Tensor):
    k = layer.top_k

    def hook(module: nn.Module, args: tuple, output: tuple):
        if layer.kind == "switch":
            dispatch, own_probs, logits = output
            allowed = allowed_E.to(logits.device)
            probs = torch.softmax(logits.float(), dim=-1)
            masked = probs.masked_fill(~allowed, -1.0)
            choice = masked.argmax(-1)
            one_hot = nn.functional.one_hot(choice, layer.num_experts)
            capacity_ok = torch.cumsum(one_hot, dim=-2) <= module.expert_capacity
            chosen_probs = probs.gather(-1, choice.unsqueeze(-1)).to(own_probs.dtype)
            return (one_hot * capacity_ok).to(dispatch.dtype), chosen_probs, logits
        logits, weights, _ = output
        allowed = allowed_E.to(logits.device)
        scores = (
            torch.softmax(logits.float(), -1)
            if layer.rule.score == "softmax"
            else logits.float().sigmoid()
        )
        bias = getattr(module, "e_score_correction_bias", None)  # DeepSeek-V3 chooses with it
        choice = (scores if bias is None else scores + bias).masked_fill(~allowed, float("-inf"))
        n_allowed = int(allowed.sum())
        top_w, top_i = torch.topk(choice, min(k, n_allowed), dim=-1)
        top_w = scores.gather(-1, top_i)
        if n_allowed < k:  # keep K columns: repeat the best allowed expert with weight 0
            pad = k - n_allowed
            top_i = torch.cat([top_i, top_i[:, :1].expand(-1, pad)], dim=-1)
            top_w = torch.cat([top_w, torch.zeros_like(top_w[:, :1]).expand(-1, pad)], dim=-1)
        if layer.rule.norm_topk:
            top_w = top_w / (top_w.sum(-1, keepdim=True) + 1e-20)
        return logits, (top_w * layer.rule.scaling).to(weights.dtype), top_i

    return hook
