"""Which device each client has: the tiers of ``[devices]`` spread over the clients."""

from __future__ import annotations

import math

from hfedmoe.foundation.config import DeviceTier, ExperimentConfig
from hfedmoe.foundation.seeding import DEVICES, rng_for


def assign_tiers(cfg: ExperimentConfig) -> list[DeviceTier | None]:
    """The device tier of each client (partition id order); None = unlimited.

    An explicit ``devices.assignment`` wins; otherwise each tier gets ``share`` of the clients
    by largest remainder, and the tiers are shuffled over clients with the run's seed.
    """
    n = cfg.federation.num_clients
    tiers = cfg.devices.tiers
    if not tiers:
        return [None] * n
    by_name = {t.name: t for t in tiers}
    if cfg.devices.assignment is not None:
        return [by_name[name] for name in cfg.devices.assignment]
    counts = tier_counts([t.share for t in tiers], n)
    order = [t for t, c in zip(tiers, counts, strict=True) for _ in range(c)]
    perm = rng_for(cfg.seed, DEVICES).permutation(n)
    return [order[i] for i in perm]


def tier_counts(shares: list[float], n: int) -> list[int]:
    """Split ``n`` clients by ``shares`` (largest remainder; ties go to the earlier tier)."""
    total = sum(shares)
    exact = [s / total * n for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts
