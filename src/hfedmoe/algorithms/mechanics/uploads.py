"""What a client may send (:class:`UploadSpec`): the server rejects anything else
(``hfedmoe.algorithms.mechanics.validation``).

An algorithm declares, beside the tensors, every metric and statistic its clients report, with
the values each may take (:class:`Range`, :class:`Statistic`); anything undeclared, missing,
of another type or out of range makes the reply a failure. The tensors:

* FedAvg-style (the default, :func:`full_upload`): every trainable tensor, each required;
* partial algorithms (:func:`partial_upload`): the trainable non-expert tensors, required, plus
  any subset of the experts, under their upload keys (``layout.expert_key``).

The uploaded tensors fall into aggregation groups (``groups``): each expert, each MoE layer's
router, and the shared parameters; the server bounds each group's update on its own
(``maths.bounds``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from torch import nn

from hfedmoe.algorithms.mechanics.layout import ExpertLayout, expert_key
from hfedmoe.algorithms.messages import Weights
from hfedmoe.model.experts import ExpertEntry

#: Limits a :class:`Range` may name instead of a number, which the server knows per reply:
#: the local optimizer steps it asked for, the client's |D_c|, and L x E.
STEPS, EXAMPLES, EXPERTS = "steps", "examples", "experts"


@dataclass(frozen=True)
class Range:
    """The values a reported number may take: finite, in [low, high] (``high`` a number or one
    of :data:`STEPS`, :data:`EXAMPLES`, :data:`EXPERTS`), an integer where ``integer``."""

    low: float = 0.0
    high: float | str = math.inf
    integer: bool = False

    def limit(self, limits: Mapping[str, float]) -> float:
        return limits[self.high] if isinstance(self.high, str) else self.high

    def describe(self, limits: Mapping[str, float]) -> str:
        kind = "an integer" if self.integer else "a number"
        return f"{kind} in [{self.low:g}, {self.limit(limits):g}]"


@dataclass(frozen=True)
class Statistic:
    """A per-expert statistic a reply carries: an (L, E) tensor (``shape``, filled in from the
    model by the upload spec) whose every value is in ``range``; ``layer_sum``: each layer's row
    sums to this (to 1e-3: u_c(e) is a mean of softmaxes, eq. (16)); ``assigned``: where the
    request assigned experts (``mechanics.assignment.ASSIGNED``), the statistic is nonzero only
    on them (``"within"``) or equals that mask exactly (``"equal"``)."""

    range: Range = Range()
    layer_sum: float | None = None
    assigned: str | None = None  # None | "within" | "equal"
    shape: tuple[int, ...] = ()


#: The statistics the algorithms share (their values are what the clients compute)
EXPERT_UPDATES = Statistic(Range(0, STEPS, integer=True), assigned="within")  # batches per expert
USAGE = Statistic(Range(0, 1), layer_sum=1.0)  # u_c(e), eq. (16)
IMPORTANCE = Statistic(Range(0, 1))  # s_c(e): eq. (5) averaged over batches
HELD = Statistic(Range(0, 1, integer=True), assigned="equal")  # a strict client's held set

#: The metrics every client reports (``FederatedAlgorithm._update`` and the client app)
BASE_METRICS: dict[str, Range] = {
    # bounded, so that the round's example-weighted mean stays finite: honest losses are a few
    # units (a cross-entropy starts near ln(vocabulary)), hundreds on a model noised under DP
    "train_loss": Range(0, 1e6),
    "train_seconds": Range(),
    "steps": Range(1, STEPS, integer=True),
    "experts_updated": Range(0, EXPERTS, integer=True),
    "experts_routed": Range(0, EXPERTS, integer=True),
    "max_active_per_step": Range(0, EXPERTS, integer=True),
    "experts_routed_per_step": Range(0, EXPERTS),
    "memory_measured_bytes": Range(),
    "memory_predicted_bytes": Range(),
    "memory_held_bytes": Range(),
    "step_flops_predicted": Range(),
    "extra_flops_predicted": Range(),
}

#: The metrics a reply must carry (the others are optional)
REQUIRED_METRICS = frozenset({"train_loss", "steps"})

#: group name -> its parts: (upload key, the entry whose part of that tensor is the group's,
#: or None for the whole tensor)
Groups = dict[str, list[tuple[str, ExpertEntry | None]]]


@dataclass
class UploadSpec:
    """What a client may send: ``required`` global tensor names, and optional expert keys
    (key -> the global tensor's name and the entry that takes the expert's part of it), grouped
    by expert in ``expert_keys``; ``stats``: the statistics a reply must carry, by name;
    ``metrics``: the metrics it may carry (:data:`REQUIRED_METRICS` must be there); ``groups``:
    the aggregation groups of the uploaded tensors, for the per-group update bound."""

    required: frozenset[str]
    experts: dict[str, tuple[str, ExpertEntry | None]] = field(default_factory=dict)
    expert_keys: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    stats: dict[str, Statistic] = field(default_factory=dict)
    metrics: dict[str, Range] = field(default_factory=lambda: dict(BASE_METRICS))
    groups: Groups = field(default_factory=dict)

    @property
    def pool(self) -> int:
        """L x E, the experts of the model (from the (L, E) statistics' shape)."""
        return math.prod(next(iter(self.stats.values())).shape) if self.stats else 0

    def references(self, global_weights: Weights) -> Weights:
        """Every acceptable key with the global tensor (or slice) its upload replaces."""
        refs = {n: global_weights[n] for n in self.required}
        for key, (name, entry) in self.experts.items():
            t = global_weights[name]
            refs[key] = t if entry is None else entry.take(t)
        return refs

    def declare(
        self, metrics: Mapping[str, Range] = {}, stats: Mapping[str, Statistic] = {}
    ) -> UploadSpec:
        """This spec with more metrics and statistics (of the (L, E) shape of the others)."""
        shape = next(iter(self.stats.values())).shape
        more = {name: replace(s, shape=shape) for name, s in stats.items()}
        return replace(self, metrics={**self.metrics, **metrics}, stats={**self.stats, **more})


def full_upload(model: nn.Module) -> UploadSpec:
    """FedAvg-style: every trainable tensor, by name, required; per-expert update counts."""
    layout = ExpertLayout.of(model)
    trainable = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    groups: Groups = {}
    for (layer, e), entries in layout.experts.items():
        parts = [(x.state_name, None if x.dim is None else x) for x in entries]
        groups[f"expert {layer}.{e}"] = [p for p in parts if p[0] in trainable]
    _add_routers_and_shared(groups, layout, trainable)
    stats = {"expert_updates": replace(EXPERT_UPDATES, shape=layout.shape)}
    return UploadSpec(trainable, stats=stats, groups=_nonempty(groups))


def partial_upload(
    model: nn.Module,
    exclude: frozenset[str] = frozenset(),
    stats: Mapping[str, Statistic] = {},
) -> UploadSpec:
    """What :func:`~hfedmoe.algorithms.mechanics.transfer.upload_weights` may send: every
    trainable non-expert tensor (required, less ``exclude``) and any experts, by
    :func:`expert_key`; the (L, E) statistics ``stats`` besides the per-expert update counts."""
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
    groups: Groups = {f"expert {ex[0]}.{ex[1]}": [(k, None) for k in ks] for ex, ks in keys.items()}
    _add_routers_and_shared(groups, layout, required)
    declared = {"expert_updates": EXPERT_UPDATES, **stats}
    shapes = {name: replace(s, shape=layout.shape) for name, s in declared.items()}
    return UploadSpec(required, experts, keys, shapes, groups=_nonempty(groups))


def _add_routers_and_shared(groups: Groups, layout: ExpertLayout, uploaded: frozenset[str]):
    """Each layer's router, then every other uploaded tensor as the shared group."""
    for layer, names in layout.routers.items():
        groups[f"router {layer}"] = [(n, None) for n in names if n in uploaded]
    grouped = {key for parts in groups.values() for key, _ in parts}
    groups["shared"] = [(n, None) for n in sorted(uploaded - grouped)]


def _nonempty(groups: Groups) -> Groups:
    return {name: parts for name, parts in groups.items() if parts}


class PartialUploads:
    """Mixin for algorithms whose clients upload with ``upload_weights``; ``STATS``: the (L, E)
    statistics its replies carry besides ``expert_updates``; ``METRICS``: its own metrics."""

    STATS: Mapping[str, Statistic] = {}
    METRICS: Mapping[str, Range] = {}

    def upload_spec(self, model: nn.Module) -> UploadSpec:
        return partial_upload(model, stats=self.STATS).declare(self.METRICS)
