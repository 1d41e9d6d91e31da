"""One differentially private round (``[privacy]``): DP-FedAvg's release, over any upload.

The arithmetic is ``maths.privacy``; this is the fold that applies it to an algorithm's upload
spec, one reply at a time like every other aggregation (``mechanics.merging``):

    w'[key] = w[key] + (sum_c f_c Delta_c[key] + N(0, s^2)) / d       for every key of the spec

where a key is a whole tensor or one expert's part of a fused one, Delta_c is client c's
update over every key it sent (a key it did not send is a zero update), f_c = min(1, C/||Delta_c||)
clips the whole update as one vector, s = 2 z C, and d is the number of clients the round
sampled, fixed before any reply. Noise goes on every key, sent or not, so the release says
nothing about which experts any client chose; the cost is that an expert only some clients hold
moves by their sum over d, not by their mean.

Under adaptive clipping (eq. P4) the fold also counts the replies whose update was not
clipped and releases that count with noise of its own, after the weights' noise; the next
round's clipping norm is computed from it (:attr:`PrivateSum.unclipped_fraction`).

Every accepted reply counts once: the methods' own weights (|D_c| for FedAvg, eqs. (17) and
(21) for HFedMoE) are not applied, because a weight a client's data sets would raise the
sensitivity above 2C / d. Memory: one float64 sum per key, as the weighted mean's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfedmoe.algorithms.maths.privacy import (
    clipped_deltas,
    gaussian_like,
    sum_noise_multiplier,
    sum_noise_std,
)
from hfedmoe.algorithms.mechanics.merging import Merge
from hfedmoe.algorithms.mechanics.uploads import UploadSpec
from hfedmoe.algorithms.messages import ClientUpdate, Weights


@dataclass(frozen=True)
class Mechanism:
    """The round's DP parameters: clipping norm C, the accountant's noise multiplier z,
    denominator d, and under adaptive clipping the noise s_b on the count of unclipped
    replies (None: fixed clipping, no count released)."""

    clip_norm: float
    noise_multiplier: float
    denominator: int
    count_noise: float | None = None

    @property
    def noise_std(self) -> float:
        """s, the standard deviation of the noise on each coordinate of the sum: z's, or under
        adaptive clipping what the count leaves of it (eq. P5)."""
        z = self.noise_multiplier
        if self.count_noise is not None:
            z = sum_noise_multiplier(z, self.count_noise)
        return sum_noise_std(z, self.clip_norm)


class PrivateSum:
    """The fold of one private round over the keys of ``spec``, from ``global_weights``."""

    def __init__(
        self,
        global_weights: Weights,
        spec: UploadSpec,
        mechanism: Mechanism,
        generator: torch.Generator,
    ):
        self.global_weights = global_weights
        self.spec = spec
        self.mechanism = mechanism
        self.generator = generator
        refs = spec.references(global_weights)
        self.references = {key: refs[key] for key in sorted(refs)}  # one order: the noise's
        # w[key] x d enters each key's sum first (its dtype is the result's), so that the sum
        # over d is w + (...) / d
        self.merge = Merge(global_weights)
        for key, ref in self.references.items():
            self._add(key, ref, float(mechanism.denominator))
        #: replies whose update was longer than C (clipped), and replies folded
        self.counts = {"dp_clipped": 0, "dp_replies": 0}
        #: adaptive clipping's release: the noisy share of replies not clipped (after finish)
        self.unclipped_fraction: float | None = None

    def _add(self, key: str, x: torch.Tensor, mass: float) -> None:
        name, entry = self.spec.experts.get(key, (key, None))
        write = None if entry is None or entry.dim is None else entry.write_
        self.merge.add(key, x, mass, name, write)

    def add(self, update: ClientUpdate) -> None:
        """Fold one accepted reply: its update over the keys it sent, clipped as one vector."""
        sent = {k: x for k, x in update.weights.items() if k in self.references}
        deltas, norm = clipped_deltas(sent, self.references, self.mechanism.clip_norm)
        for key, delta in deltas.items():
            self._add(key, delta, 1.0)
        self.counts["dp_replies"] += 1
        self.counts["dp_clipped"] += int(norm > self.mechanism.clip_norm)

    def finish(self) -> Weights:
        """The release: every key's sum plus its noise, over d, written into the weights."""
        std = self.mechanism.noise_std
        for key, ref in self.references.items():  # in sorted order: reproducible noise
            self._add(key, gaussian_like(ref, std, self.generator), 1.0)
        d = float(self.mechanism.denominator)
        if self.mechanism.count_noise is not None:  # eq. P4's b, drawn after the weights' noise
            unclipped = self.counts["dp_replies"] - self.counts["dp_clipped"]
            noise = torch.randn((), dtype=torch.float64, generator=self.generator)
            self.unclipped_fraction = (unclipped + float(noise) * self.mechanism.count_noise) / d
        return self.merge.finish({key: d for key in self.references})
