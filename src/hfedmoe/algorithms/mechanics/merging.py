"""The next global weights as weighted means of what the clients sent, one reply at a time.

Every aggregation in hfedmoe is, per tensor or per part of one (an expert, a router row), a
weighted mean sum_c m_c x_c / sum_c m_c whose mass m_c depends on client c's own reply only
(|D_c|, its usage, whether it qualifies): eq. (17) per expert, eq. (21) per router with
normalised alphas, FedAvg for the rest. So the server folds each reply into running sums
(``WeightedSums``) as it arrives and drops it: it holds one reply, not K. The one exception,
eq. (20) without normalisation, divides by |S_global| instead of the masses; that divisor is
known at the end (:meth:`Merge.finish`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from hfedmoe.algorithms.maths.averaging import WeightedSums
from hfedmoe.algorithms.mechanics.layout import ExpertLayout, expert_key
from hfedmoe.algorithms.messages import ClientUpdate, Weights

#: writes a merged part into (a copy of) the whole global tensor, in place
Writer = Callable[[torch.Tensor, torch.Tensor], object]


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

    def __init__(self, global_weights: Weights, layout: ExpertLayout | None = None):
        self.global_weights = global_weights
        self.layout = layout
        self.sums = WeightedSums()
        self._targets: dict[str, tuple[str, Writer | None]] = {}  # key -> (tensor, writer)

    def add(
        self, key: str, x: torch.Tensor, mass: float, name: str | None = None, write=None
    ) -> None:
        """Fold ``mass`` x ``x`` into ``key``; ``name``/``write``: the global tensor it is a part
        of and how to write it there (default: ``key`` is a whole tensor)."""
        if mass > 0:
            self.sums.add(key, x, mass)
            self._targets.setdefault(key, (key if name is None else name, write))

    def add_experts(self, update: ClientUpdate, mass_LE: torch.Tensor) -> None:
        """Every expert with mass_LE[l, e] > 0 (the reply must carry it), under its upload key."""
        assert self.layout is not None
        masses = mass_LE.tolist()
        for (layer, e), entries in self.layout.experts.items():
            if (m := float(masses[layer][e])) > 0:
                for x in entries:
                    key = expert_key(x, (layer, e))
                    write = None if x.dim is None else x.write_
                    self.add(key, update.weights[key], m, x.state_name, write)

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
            merged = self.sums.pop(key, divisors.get(key))
            if write is None:
                new[name] = merged
                continue
            if name not in copied:
                new[name] = new[name].clone()
                copied.add(name)
            write(new[name], merged)
        self._targets.clear()
        return new
