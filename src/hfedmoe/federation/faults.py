"""Injected client faults, for tests and experiments (``[faults]`` in the config).

A sampled client misbehaves in a round if a ``faults.events`` entry names its (round,
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
  corrupted update, which the server must reject (``hfedmoe.algorithms.mechanics.validation``).

The server never consults this module: it sees only what arrives.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import torch

from hfedmoe.algorithms.messages import ClientUpdate
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.seeding import FAULTS, rng_for

#: how much an injected "norm" fault scales the update (absurd by any standard)
NORM_FACTOR = 1e6


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
