"""What of a model travels between the server and its clients.

Full fine-tuning: the whole state dict. With a frozen base (LoRA, QLoRA): only the trainable
tensors. Every party builds the same frozen base itself, from the same public checkpoint and the
run's seed (upcycling and router initialisation are seeded), so the base never has to travel;
a quantised base could not even travel, since bitsandbytes' quantisation state does not load
into an independently quantised model.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

HEADS = ("classifier", "score")  # where a classifier keeps its new, task-specific head


def new_head(model: nn.Module) -> nn.Module | None:
    """A classifier's new head (random at the start, so every method trains it in full)."""
    for name in HEADS:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def has_frozen_base(model: nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors server and clients exchange (detached, not copied)."""
    if not has_frozen_base(model):
        return model.state_dict()
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_shared_state(
    model: nn.Module, weights: dict[str, torch.Tensor], allow_missing: set[str] = frozenset()
) -> None:
    """Load what :func:`shared_state` produced; every trainable tensor must be there (except
    ``allow_missing``) and nothing else may be."""
    required = set(shared_state(model)) - set(allow_missing)
    if missing := sorted(required - set(weights)):
        raise KeyError(f"weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    own = model.state_dict()
    if unexpected := sorted(set(weights) - set(own)):
        raise KeyError(f"weights have {len(unexpected)} unknown tensors, e.g. {unexpected[:3]}")
    model.load_state_dict(weights, strict=False)


@contextlib.contextmanager
def swapped_in(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The block runs with ``model``'s tensors named in ``weights`` replaced by those values;
    they are put back on exit, bit for bit. Holds a copy of just those tensors."""
    own = model.state_dict()
    saved = {name: own[name].detach().clone() for name in weights}
    model.load_state_dict(weights, strict=False)
    try:
        yield
    finally:
        model.load_state_dict(saved, strict=False)  # into whatever tensors the model holds now


def held_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensors (parameters and buffers) a model holds: the weights a
    client keeps resident (a tied tensor counts once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def experts_only(model: nn.Module, expert_params: set[int]) -> Iterator[None]:
    """Freeze every trainable parameter but the experts' (``id``s in ``expert_params``) and a
    classifier's new head for the block: the routers and shared parameters of a method that
    trains experts alone (FLUX)."""
    keep = set(expert_params)
    if (head := new_head(model)) is not None:
        keep |= {id(p) for p in head.parameters()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


#: recipe -> (parameter name -> the first model's Parameter holding it), weakly: a base no
#: model holds any more is freed with its last model
_FROZEN_BASES: dict[str, weakref.WeakValueDictionary] = {}


def share_frozen_base(model: nn.Module, recipe: str) -> int:
    """Hold ``model``'s frozen base once per process: its frozen floating-point parameters
    become views of the tensors the first model built from ``recipe`` holds, where they are
    equal; returns the bytes it no longer holds itself.

    A simulation keeps the server's model and a resident client model in one process, both
    built from the same checkpoint and seed; with LoRA, QLoRA or MoE adapters their frozen
    bases are identical and never written (only the trainable tensors travel and are loaded,
    ``load_shared_state``), so one copy serves both. Each model keeps its own Parameter objects
    (so moving one model to a device moves only its own, and that copy is then its own);
    quantised parameters (not floating point) are not shared. Written here because neither
    transformers nor PEFT shares weights between model instances.
    """
    if not has_frozen_base(model):
        return 0
    canonical = _FROZEN_BASES.setdefault(recipe, weakref.WeakValueDictionary())
    freed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad or not p.is_floating_point():
                continue
            held = canonical.get(name)
            if held is None:
                canonical[name] = p
            elif held.data_ptr() != p.data_ptr() and _same(held, p):
                freed += p.numel() * p.element_size()
                p.data = held.data
    return freed


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
