"""What a client may upload (:class:`UploadSpec`): the server rejects anything else
(``hfedmoe.algorithms.mechanics.validation``).

* FedAvg-style (the default, :func:`full_upload`): every trainable tensor, each required;
* partial algorithms (:func:`partial_upload`): the trainable non-expert tensors, required, plus
  any subset of the experts, under their upload keys (``layout.expert_key``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from hfedmoe.algorithms.mechanics.layout import ExpertLayout, expert_key
from hfedmoe.algorithms.messages import Weights
from hfedmoe.model.experts import ExpertEntry


@dataclass
class UploadSpec:
    """The tensors a client may upload: ``required`` global names, and optional expert keys
    (key -> the global tensor's name and the entry that takes the expert's part of it),
    grouped by expert in ``expert_keys``; ``stats``: the statistics a reply must carry, by name,
    with their shape."""

    required: frozenset[str]
    experts: dict[str, tuple[str, ExpertEntry | None]] = field(default_factory=dict)
    expert_keys: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    stats: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def references(self, global_weights: Weights) -> Weights:
        """Every acceptable key with the global tensor (or slice) its upload replaces."""
        refs = {n: global_weights[n] for n in self.required}
        for key, (name, entry) in self.experts.items():
            t = global_weights[name]
            refs[key] = t if entry is None else entry.take(t)
        return refs


def full_upload(trainable: list[str], shape: tuple[int, int]) -> UploadSpec:
    """FedAvg-style: every trainable tensor, by name, required; per-expert update counts of
    the (L, E) pool."""
    return UploadSpec(frozenset(trainable), stats={"expert_updates": shape})


def partial_upload(
    model: nn.Module, exclude: frozenset[str] = frozenset(), stats: tuple[str, ...] = ()
) -> UploadSpec:
    """What :func:`upload_weights` may send: every trainable non-expert tensor (required, less
    ``exclude``) and any experts, by :func:`expert_key`; the (L, E) statistics ``stats`` besides
    the per-expert update counts."""
    layout = ExpertLayout.of(model)
    expert_names = layout.expert_names
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    required = frozenset(n for n in trainable if n not in expert_names and n not in exclude)
    experts = {
        expert_key(x, expert): (x.state_name, None if x.dim is None else x)
        for expert, entries in layout.experts.items()
        for x in entries
    }
    keys = {ex: [expert_key(x, ex) for x in entries] for ex, entries in layout.experts.items()}
    shapes = {name: layout.shape for name in ("expert_updates", *stats)}
    return UploadSpec(required, experts, keys, shapes)


class PartialUploads:
    """Mixin for algorithms whose clients upload with :func:`upload_weights`; ``STATS``: the
    (L, E) statistics its replies carry besides ``expert_updates``."""

    STATS: tuple[str, ...] = ()

    def upload_spec(self, model: nn.Module) -> UploadSpec:
        return partial_upload(model, stats=self.STATS)
