"""The next global weights as weighted means of what the clients sent, one reply at a time.

Every aggregation in hfedmoe is, per tensor or per part of one (an expert, a router row), a
weighted mean sum_c m_c x_c / sum_c m_c whose mass m_c depends on client c's own reply only
(|D_c|, its usage, whether it qualifies): eq. (17) per expert, eq. (21) per router with
normalised alphas, FedAvg for the rest. So the server folds each reply into running sums
(``WeightedSums``) as it arrives and drops it: it holds one reply, not K. The one exception,
eq. (20) without normalisation, divides by |S_global| instead of the masses; that divisor is
known at the end (:meth:`Merge.finish`).

Two defences live here too (:class:`MergePolicy`, from ``[federation]``):

* **A share cap** (``max_client_share``, :func:`~hfedmoe.algorithms.maths.bounds.capped_mass`).
  Where a mass depends on what the client reported (HFedMoE's router mass from u_c and s_c,
  eqs. (19)-(21): ``add(..., examples=|D_c|)``), no client's share of a key's weight may
  exceed max(cap, its share of the key's contributors' examples): its reports can buy it at
  most ``cap``, however it inflates them; the share its own data gives (which the server
  knows) is never cut. A mass of |D_c| times a yes-or-no (FedAvg, eq. (17), the holders of a
  router row) is its data share by construction and is never capped. FLEX-MoE's usage and
  FLUX's routed-sample counts are not capped: those methods give an honest client nearly all
  of an expert by design (a cap of 1/2 changed 8 experts of FLEX-MoE's two-round golden run),
  so there the statistics' validated ranges (u_c(e) in [0, 1] summing to 1 per layer;
  |D_i^e| <= |D_i|) are the bound. With a cap of at least 1/2 at most one client per key can
  exceed it, so the fold keeps a copy of the largest reported contribution of each key (at
  most one reply's reported tensors: HFedMoE's routers) and takes the excess back out at the
  end.
* **A robust aggregator** (``robust``: coordinate-wise median or trimmed mean,
  ``maths.robust``). It needs every reply's value at once, so it holds the round's replies for
  every key (K replies instead of running sums: K times the memory of an upload); a key with
  fewer than :data:`ROBUST_MIN` contributors (a sparse expert with one or two holders), where
  a median is the reply itself or the mean of two, falls back to the (capped) weighted mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from hfedmoe.algorithms.maths.averaging import WeightedSums
from hfedmoe.algorithms.maths.bounds import capped_mass
from hfedmoe.algorithms.maths.robust import coordinate_median, trimmed_mean
from hfedmoe.algorithms.mechanics.layout import ExpertLayout, expert_key
from hfedmoe.algorithms.messages import ClientUpdate, Weights

#: writes a merged part into (a copy of) the whole global tensor, in place
Writer = Callable[[torch.Tensor, torch.Tensor], object]


#: the fewest contributors for which a key is aggregated robustly
ROBUST_MIN = 3


@dataclass(frozen=True)
class MergePolicy:
    """How a :class:`Merge` combines the replies of one key (the config's ``[federation]``)."""

    max_client_share: float = 1.0  # >= 0.5; 1 = no cap
    robust: Literal["median", "trimmed-mean"] | None = None
    trim_fraction: float = 0.25
    wide_sums: bool = True  # federation.sum_precision: float64 sums of 32-bit weights, or not


@dataclass
class _Top:
    """The largest reported contribution to a key so far: its mass, |D_c| and tensor."""

    mass: float
    examples: int
    x: torch.Tensor


def _row_writer(row: int) -> Writer:
    def write(tensor: torch.Tensor, part: torch.Tensor) -> None:
        tensor[row] = part

    return write


class Merge:
    """Running weighted means of one round's replies, written over the global weights.

    Each ``add`` names a key (a tensor, an expert's part of one, a router row) and the mass of
    this reply for it; :meth:`finish` returns the global weights with every key someone added
    replaced by its weighted mean. A key nobody added (every mass 0) keeps its global value.
    A fused tensor is copied once, and its merged parts are written into the copy in place.
    """

    def __init__(
        self,
        global_weights: Weights,
        layout: ExpertLayout | None = None,
        policy: MergePolicy | None = None,
    ):
        self.global_weights = global_weights
        self.layout = layout
        self.policy = policy or MergePolicy()
        self.sums = WeightedSums(self.policy.wide_sums)
        self._targets: dict[str, tuple[str, Writer | None]] = {}  # key -> (tensor, writer)
        self._top: dict[str, _Top] = {}  # reported keys: the largest contribution
        self._examples: dict[str, int] = {}  # reported keys: sum of |D_c| of the contributors
        self._held: dict[str, list[tuple[torch.Tensor, float, int | None]]] = {}  # robust
        #: what the defences did this round: keys whose top share was capped, and keys too
        #: sparse for the robust aggregator
        self.counts = {"share_capped": 0, "robust_fallback": 0}

    def add(
        self,
        key: str,
        x: torch.Tensor,
        mass: float,
        name: str | None = None,
        write=None,
        examples: int | None = None,
    ) -> None:
        """Fold ``mass`` x ``x`` into ``key``; ``name``/``write``: the global tensor it is a part
        of and how to write it there (default: ``key`` is a whole tensor); ``examples``: the
        client's |D_c| where ``mass`` depends on what it reported (the share cap applies)."""
        if mass <= 0:
            return
        self._targets.setdefault(key, (key if name is None else name, write))
        if self.policy.robust is not None:
            self._held.setdefault(key, []).append((x, mass, examples))
        else:
            self._fold(key, x, mass, examples)

    def _fold(self, key: str, x: torch.Tensor, mass: float, examples: int | None) -> None:
        self.sums.add(key, x, mass)
        if examples is None or self.policy.max_client_share >= 1:
            return
        self._examples[key] = self._examples.get(key, 0) + examples
        top = self._top.get(key)
        if top is None or mass > top.mass:  # a copy: the reply itself is let go after its fold
            self._top[key] = _Top(mass, examples, x.detach().clone())

    def add_experts(
        self, update: ClientUpdate, mass_LE: torch.Tensor, reported: bool = False
    ) -> None:
        """Every expert with mass_LE[l, e] > 0 (the reply must carry it), under its upload key;
        ``reported``: the masses depend on the client's reports (the share cap applies)."""
        assert self.layout is not None
        masses = mass_LE.tolist()
        examples = update.num_examples if reported else None
        for (layer, e), entries in self.layout.experts.items():
            if (m := float(masses[layer][e])) > 0:
                for x in entries:
                    key = expert_key(x, (layer, e))
                    write = None if x.dim is None else x.write_
                    self.add(key, update.weights[key], m, x.state_name, write, examples)

    def add_rows(self, name: str, x: torch.Tensor, mass_R: Sequence[float]) -> None:
        """Row r of tensor ``name`` with mass ``mass_R[r]`` (FedMoE's router rows)."""
        for row, m in enumerate(mass_R):
            self.add(f"{name}#row{row}", x[row], float(m), name, _row_writer(row))

    def add_shared(self, update: ClientUpdate, also: Sequence[str] = ()) -> None:
        """FedAvg by |D_c|: the shared tensors (neither expert nor router) and ``also``."""
        assert self.layout is not None
        skip = self.layout.expert_names | set(self.layout.router_names)
        for name in [n for n in self.global_weights if n not in skip] + list(also):
            if name in update.weights:
                self.add(name, update.weights[name], update.num_examples)

    def finish(self, divisors: Mapping[str, float] | None = None) -> Weights:
        """The new global weights: each key's weighted mean (or its sum over ``divisors[key]``)
        over the global value."""
        divisors = divisors or {}
        new = dict(self.global_weights)
        copied: set[str] = set()
        for key, (name, write) in self._targets.items():
            merged = self._merged(key, divisors.get(key))
            if write is None:
                new[name] = merged
                continue
            if name not in copied:
                new[name] = new[name].clone()
                copied.add(name)
            write(new[name], merged)
        self._targets.clear()
        return new

    def _merged(self, key: str, divisor: float | None) -> torch.Tensor:
        """``key``'s aggregate: robust where asked and it has enough contributors, else the
        weighted mean with the share cap."""
        held = self._held.pop(key, None)
        if held is not None:
            if len(held) >= ROBUST_MIN:
                stacked = torch.stack([x for x, _, _ in held])
                if self.policy.robust == "median":
                    robust = coordinate_median(stacked)
                else:
                    robust = trimmed_mean(stacked, self.policy.trim_fraction)
                return robust.to(held[0][0].dtype)
            self.counts["robust_fallback"] += 1
            for x, mass, examples in held:
                self._fold(key, x, mass, examples)
        top = self._top.pop(key, None)
        if top is not None:
            total = self.sums.mass(key)
            data_share = top.examples / self._examples.pop(key)
            share = max(self.policy.max_client_share, data_share)
            kept = capped_mass(top.mass, total - top.mass, share)
            if kept < top.mass * (1 - 1e-12):
                self.sums.reweigh(key, top.x, top.mass, kept)
                self.counts["share_capped"] += 1
        return self.sums.pop(key, divisor)
