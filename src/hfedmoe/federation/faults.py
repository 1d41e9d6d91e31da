"""Injected client faults, for tests and experiments (``[faults]`` in the config).

A sampled client misbehaves in a round if it is one of ``faults.attackers`` (then it does
``faults.attack`` whenever it is sampled), if a ``faults.events`` entry names its (round,
partition), or else with probability ``faults.rate``, drawn from (seed, round, partition) so a
run and its resumption inject the same faults. What it does
(:data:`~hfedmoe.foundation.config.FaultKind`):

* ``dropout``: never replies (:class:`Dropout`: the embedded engine loses the message; on the
  other engines the client app's process dies);
* ``exception``: raises during training (an error reply);
* ``deadline``: replies, but after ``federation.round_timeout``;
* ``hang``: never returns (:func:`hang`); ``crash``: its process dies at once (:func:`crash`),
  as when the OS kills it for memory. Both need ``federation.round_timeout``, which on the
  embedded engine runs the clients in worker processes: one that hangs is stopped at the
  timeout, and one that dies takes only its worker with it;
* ``nan`` / ``inf`` / ``shape`` / ``dtype`` / ``unknown-key`` / ``missing-key`` / ``norm``: a
  corrupted update, which the server must reject (``hfedmoe.algorithms.mechanics.validation``);
* attacks (:func:`attack`), what a hostile client sends to steer the model: ``inflate-examples``
  (it claims 10^12 examples), ``sign-flip`` (its update negated, w - delta), ``scale-update``
  (delta times ``faults.scale``), ``noise`` (its weights plus Gaussian noise at each tensor's
  own scale), ``inflate-stats`` (every statistic at the edge of its declared range, where the
  server's checks still accept it), ``inf-metric`` (a metric that is infinite).

The server never consults this module: it sees only what arrives.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import torch

from hfedmoe.algorithms.mechanics.uploads import EXAMPLES, EXPERTS, STEPS, UploadSpec
from hfedmoe.algorithms.messages import ClientUpdate, Weights
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.seeding import FAULTS, rng_for

#: how much an injected "norm" fault scales the update (absurd by any standard)
NORM_FACTOR = 1e6

#: the examples an inflate-examples attacker claims
INFLATED_EXAMPLES = 10**12

#: what an inflate-stats attacker reports for a statistic declared without an upper limit
UNBOUNDED_EDGE = 1e30


class Dropout(BaseException):
    """The client vanishes without replying. A BaseException: nothing in the client app may
    turn it into an error reply."""


class InjectedFault(RuntimeError):
    """The ``exception`` fault: training raises."""


def reply_late(seconds: float) -> None:
    """The ``deadline`` fault: hold the reply back ``seconds`` (``federation.round_timeout``).

    A real wait, so that an engine sees a late reply (the embedded engine stops the client at
    its deadline).
    """
    time.sleep(seconds)


def hang() -> None:
    """The ``hang`` fault: the client never returns (until its process is stopped)."""
    while True:
        time.sleep(3600)


def crash() -> None:
    """The ``crash`` fault: the client's process dies at once, as when the OS kills it."""
    os.kill(os.getpid(), signal.SIGKILL)


def planned_fault(cfg: ExperimentConfig, server_round: int, partition_id: int) -> str | None:
    """The fault client ``partition_id`` injects in ``server_round``, if any."""
    if partition_id in cfg.faults.attackers:
        return cfg.faults.attack
    for event in cfg.faults.events:
        if event.round == server_round and event.partition == partition_id:
            return event.kind
    if cfg.faults.rate > 0:
        rng = rng_for(cfg.seed, FAULTS, server_round, partition_id)
        if rng.random() < cfg.faults.rate:
            return cfg.faults.kinds[int(rng.integers(len(cfg.faults.kinds)))]
    return None


def corrupt(update: ClientUpdate, kind: str, sent: dict[str, torch.Tensor]) -> ClientUpdate:
    """``update`` with its weights corrupted as ``kind`` says (on the first tensor by name).

    ``sent``: the weights the client received (the ``norm`` fault moves away from them).
    """
    weights = dict(update.weights)
    name = min(weights)
    t = weights[name]
    if kind in ("nan", "inf"):
        weights[name] = t.clone()
        weights[name].view(-1)[0] = float(kind)  # float("nan"), float("inf")
    elif kind == "shape":
        weights[name] = t.flatten()[:-1].clone()
    elif kind == "dtype":
        weights[name] = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
    elif kind == "unknown-key":
        weights["injected.unknown.weight"] = torch.zeros(2)
    elif kind == "missing-key":
        del weights[name]
    elif kind == "norm":
        weights = {
            k: (sent[k] + NORM_FACTOR * (v - sent[k])) if k in sent else NORM_FACTOR * v
            for k, v in weights.items()
        }
    else:
        raise ValueError(f"not an update fault: {kind}")
    return dataclasses.replace(update, weights=weights)


def references(update: ClientUpdate, spec: UploadSpec, sent: Weights) -> Weights:
    """What each uploaded key replaces in the weights the client received: the tensor under
    the same key, or its expert's part of the whole tensor it downloaded."""
    refs = {}
    for key in update.weights:
        if key in sent:
            refs[key] = sent[key]
        else:
            name, entry = spec.experts[key]
            refs[key] = sent[name] if entry is None else entry.take(sent[name])
    return refs


def attack(
    update: ClientUpdate,
    kind: str,
    refs: Weights,
    spec: UploadSpec,
    cfg: ExperimentConfig,
    server_round: int,
    partition_id: int,
) -> ClientUpdate:
    """``update`` as a hostile client sends it instead (``kind``: an attack of the module
    docstring); ``refs``: what each uploaded tensor replaces (:func:`references`)."""
    weights = dict(update.weights)
    if kind == "inflate-examples":
        return dataclasses.replace(update, num_examples=INFLATED_EXAMPLES)
    if kind == "inf-metric":
        return dataclasses.replace(update, metrics={**update.metrics, "steps": math.inf})
    if kind == "inflate-stats":
        limits = {
            STEPS: cfg.train.local_steps,
            EXAMPLES: update.num_examples,
            EXPERTS: spec.pool,
        }
        stats = {name: _inflated(t, spec, name, limits) for name, t in update.stats.items()}
        return dataclasses.replace(update, stats=stats)
    generator = torch.Generator().manual_seed(
        int(rng_for(cfg.seed, FAULTS, server_round, partition_id).integers(2**31))
    )
    for key, w in weights.items():
        if not w.is_floating_point():
            continue
        ref = refs[key]
        if kind == "sign-flip":
            weights[key] = 2 * ref - w
        elif kind == "scale-update":
            weights[key] = ref + cfg.faults.scale * (w - ref)
        elif kind == "noise":
            noise = torch.randn(w.shape, generator=generator, dtype=w.dtype)
            weights[key] = w + noise * w.float().std(unbiased=False).to(w.dtype)
        else:
            raise ValueError(f"not an attack: {kind}")
    return dataclasses.replace(update, weights=weights)


def _inflated(t: torch.Tensor, spec: UploadSpec, name: str, limits: dict) -> torch.Tensor:
    """Statistic ``name`` at the edge of what the server accepts: each layer spread evenly
    over its declared sum, else its upper limit; a statistic tied to the experts the client
    uploaded or was assigned keeps its zeros (claiming more is rejected outright)."""
    declared = spec.stats.get(name)
    if declared is None:
        return t
    if declared.layer_sum is not None:
        return torch.full_like(t, declared.layer_sum / t.shape[-1])
    high = declared.range.limit(limits)
    edge = UNBOUNDED_EDGE if not math.isfinite(high) else high
    if declared.assigned is not None or name == "expert_updates":
        return torch.where(t != 0, torch.full_like(t, edge), t)
    return torch.full_like(t, edge)
