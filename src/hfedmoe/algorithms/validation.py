"""What the server accepts from a client: a check of every update before aggregation.

A reply that fails any check is rejected with a reason (recorded per round in metrics.jsonl as
``failures``) and never reaches the algorithm, so one faulty or malicious client cannot corrupt
the global model. An algorithm states what its clients may upload (:class:`UploadSpec`):

* FedAvg-style (the default): every trainable tensor, each required;
* partial algorithms (``hfedmoe.algorithms.partial``): the trainable non-expert tensors,
  required, plus any subset of the experts, under their upload keys.

Checks, in order: unknown keys, missing keys, shapes, dtypes, finite values, example count, and
the size of the update: ``||w_c - w|| <= max_update_ratio * ||w||`` over the uploaded tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hfedmoe.model.experts import ExpertEntry

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class UploadSpec:
    """The tensors a client may upload: ``required`` global names, and optional expert keys
    (key -> the global tensor's name and the entry that takes the expert's part of it)."""

    required: frozenset[str]
    experts: dict[str, tuple[str, ExpertEntry | None]] = field(default_factory=dict)

    def references(self, global_weights: Weights) -> Weights:
        """Every acceptable key with the global tensor (or slice) its upload replaces."""
        refs = {n: global_weights[n] for n in self.required}
        for key, (name, entry) in self.experts.items():
            t = global_weights[name]
            refs[key] = t if entry is None else entry.take(t)
        return refs


@dataclass(frozen=True)
class Rejection:
    reason: str  # "unknown-keys" | "missing-keys" | "shape" | "dtype" | "non-finite" | ...
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def check_update(
    weights: Weights,
    num_examples: object,
    spec: UploadSpec,
    global_weights: Weights,
    max_update_ratio: float,
) -> Rejection | None:
    """None if an update (``weights`` from ``num_examples`` examples) is acceptable against
    ``global_weights``, else why not."""
    refs = spec.references(global_weights)
    keys = set(weights)
    if unknown := sorted(keys - set(refs)):
        return Rejection("unknown-keys", f"{len(unknown)} unknown tensor(s), e.g. {unknown[0]}")
    if missing := sorted(spec.required - keys):
        return Rejection("missing-keys", f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    for key in sorted(keys):
        t, ref = weights[key], refs[key]
        if t.shape != ref.shape:
            return Rejection("shape", f"{key} is {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            return Rejection("dtype", f"{key} is {t.dtype}, expected {ref.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return Rejection("non-finite", f"{key} holds NaN or Inf")
    if not (isinstance(num_examples, int) and num_examples > 0):
        return Rejection("examples", f"num_examples is {num_examples!r}, expected > 0")
    floats = [k for k in keys if refs[k].is_floating_point()]
    delta = math.sqrt(sum(float((weights[k] - refs[k]).double().square().sum()) for k in floats))
    norm = math.sqrt(sum(float(refs[k].double().square().sum()) for k in floats))
    if delta > max_update_ratio * max(norm, 1e-12):
        return Rejection(
            "norm",
            f"the update moves the weights by {delta:.3g}, {delta / max(norm, 1e-12):.3g} x "
            f"their norm (limit {max_update_ratio:g})",
        )
    return None


def full_upload(trainable: list[str]) -> UploadSpec:
    """FedAvg-style: every trainable tensor, by name, required."""
    return UploadSpec(frozenset(trainable))
