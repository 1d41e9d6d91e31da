"""Which experts a client is assigned this round, as the server writes it into a request.

Request config keys (set by the server, read by the client):

* ``ASSIGNED``: flat indices ``layer * E + e`` of the experts the client may train this round;
  absent = the client chooses per batch (HFedMoE's backward-only mode);
* ``STRICT``: 1 = the client holds only its assigned experts: it downloads and uploads only
  them and routes tokens only among them (``ExpertModel.restrict_routing``).

HFedMoE and the baselines differ in *which* experts and *with which weights*; the mechanics
they share are in this package, one job a module: assignment (here), the layout of experts in
the weights (``layout``), downloads and uploads (``transfer``), what a client may upload
(``uploads``), merging experts some clients trained (``merging``) and the client's per-step
hooks (``hooks``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from hfedmoe.algorithms.maths.importance import select_active
from hfedmoe.algorithms.messages import TrainRequest

ASSIGNED = "assigned-experts"
STRICT = "strict-routing"


def assigned_mask(mask_LE: torch.Tensor) -> list[int]:
    """The ``ASSIGNED`` request value of an (L, E) mask."""
    return mask_LE.flatten().nonzero().flatten().tolist()


def mask_of(
    request: TrainRequest, shape: tuple[int, int], key: str = ASSIGNED
) -> torch.Tensor | None:
    """The (L, E) mask of the experts a task lists under ``key`` (default its ``ASSIGNED``
    ones), None if it lists none."""
    return config_mask(request.config, shape, key)


def config_mask(
    config: Mapping[str, object], shape: tuple[int, ...], key: str = ASSIGNED
) -> torch.Tensor | None:
    """:func:`mask_of` from a request's config alone (what the server checks a reply with)."""
    if key not in config:
        return None
    mask = torch.zeros(math.prod(shape), dtype=torch.bool)
    mask[torch.tensor(config[key], dtype=torch.long)] = True
    return mask.view(shape)


def held_experts(score_LE: torch.Tensor, budget: int) -> torch.Tensor:
    """A held set for strict routing: the best expert of each layer, then the best of the
    rest, by ``score_LE``, ``budget`` in all (at least one per layer, so every layer can
    route). (L, E) bool."""
    L, E = score_LE.shape
    if budget < L:
        raise ValueError(f"strict mode needs a budget of at least one expert per layer ({L})")
    held = torch.zeros(L, E, dtype=torch.bool)
    held[torch.arange(L), score_LE.argmax(1)] = True
    return held | select_active(score_LE, ~held, budget - L, "global")


def own_or_mean(
    scores: Mapping[int, torch.Tensor], client: int, rng: np.random.Generator, shape: tuple
) -> torch.Tensor:
    """A client's per-expert score for assigning it experts: its own from its last round, else
    the mean of every client's, else (nobody has reported yet) a draw from ``rng``."""
    if client in scores:
        return scores[client]
    if scores:
        return torch.stack(list(scores.values())).mean(0)
    return torch.from_numpy(rng.random(shape))
