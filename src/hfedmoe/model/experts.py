"""The expert interface: one view of the expert pool of any supported MoE model.

METHOD.md §1: the pool is E = {E_(l,e)}, L MoE layers x E experts each, with one router (gating
network) per MoE layer; every other parameter (embeddings, attention, norms, heads, shared
experts) is *shared*. Algorithms see models only through :class:`ExpertModel`: the pool and
the parameter groups, routing capture and restriction, backward-only updates of a subset,
reading and writing one expert, and the costs the budget model needs. Finding the MoE blocks is
``moe_layers``; what a forward pass records is ``routing``.

Shape legend: B samples, T tokens per sample, N tokens in a layer's stream (B*T), E experts per
layer, K experts per token, L MoE layers.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.model.expert_axis import ExpertAxis
from hfedmoe.model.moe_layers import ExpertId, MoELayer, expert_modules, find_moe_layers
from hfedmoe.model.quantize import logical_numel
from hfedmoe.model.routing import RoutingCapture, strict_hook

__all__ = ["ExpertEntry", "ExpertId", "ExpertModel", "MoELayer", "ParamBytes"]


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
            layer.router.register_forward_hook(strict_hook(layer, allowed_LE[layer.position]))
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
        tensors: what a server averages per expert. Built once: the layers were found when
        this view was made, so their entries do not change."""
        return self._entry_map

    @functools.cached_property
    def _params(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    @functools.cached_property
    def _entry_map(self) -> dict[ExpertId, list[ExpertEntry]]:
        names = {id(p): n for n, p in self._params.items()}
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
        params = self._params
        return {
            x.local_name: x.take(params[x.state_name].detach()).clone()
            for x in self._entries(expert)
        }

    @torch.no_grad()
    def write_expert(self, expert: ExpertId, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite expert ``(layer, e)``'s trainable tensors; nothing else changes."""
        entries = self._entries(expert)
        params = self._params
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
        return self._entry_map[expert]

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
