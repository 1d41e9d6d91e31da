"""The state a run needs to continue after a crash, written atomically after every round.

``RUN_DIR/checkpoint.safetensors`` holds, as of the end of round ``round``:

- ``weights/<name>``: the global model's travelling state (``hfedmoe.model.state``);
- ``algorithm/<path>``: the algorithm's tensors (expert statistics, per-client histories,
  baseline state), with its other values in the metadata;
- ``nodes/<node>/<name>``: what each simulated node keeps between rounds (a FLEX-MoE client's
  personal routers), where the engine can see it (the embedded engine);
- metadata: the round, the node devices, the elapsed seconds and the code that wrote it
  (:func:`code_digest`).

The metrics of the rounds so far are not repeated in it (the header would grow with every
round, and the run's writes with the square of the rounds): ``RUN_DIR/metrics.jsonl`` has them,
appended and fsynced before the checkpoint of the same round is written, and a resume reads
rounds 0..``round`` back from there. The weights are written as they are, without a copy,
except tensors that share storage (tied embeddings), which safetensors cannot write twice.

There is no RNG state to store: every random stream is a pure function of (seed, purpose,
round, client) (``hfedmoe.foundation.seeding``), so round r + 1 draws the same numbers whether
or not the process was restarted after round r. The one exception is the secret of a private
run (``[privacy]``), which its noise and samples come from instead of the seed: it is part of
the algorithm's state here, so a checkpoint of a private run is the server's secret too.

One file, written to a temporary name, fsynced and renamed over the old one: a crash at any
moment leaves either the previous round's checkpoint or this one, never a mixture.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from hfedmoe.foundation.errors import HFedMoEError
from hfedmoe.foundation.files import writing

CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 2  # 1 kept every round's metrics in the header; still read
HEADER_KEYS = ("format_version", "round", "algorithm", "devices", "elapsed_seconds")

Weights = dict[str, torch.Tensor]


@dataclass
class RunState:
    """Everything the round loop carries from one round to the next."""

    round: int
    weights: Weights
    algorithm: dict[str, Any] = field(default_factory=dict)
    nodes: dict[int, dict[str, Weights]] = field(default_factory=dict)  # node -> record -> ...
    devices: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)  # the metrics records (metrics.jsonl)
    elapsed_seconds: float = 0.0


@functools.cache
def code_digest() -> str:
    """The hfedmoe version and a hash of its source: resuming with other code cannot promise
    the run an uninterrupted one would have been."""
    import hfedmoe

    root = Path(hfedmoe.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{hfedmoe.__version__}+{h.hexdigest()[:16]}"


def flatten(tree: dict[str, Any], prefix: str) -> tuple[Weights, dict[str, Any]]:
    """Split a nested dict into its tensors (``prefix/a/b``) and the JSON rest (same nesting)."""
    tensors: Weights = {}
    rest: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().contiguous().clone()
        elif isinstance(value, dict):
            sub_tensors, sub_rest = flatten(value, name)
            tensors.update(sub_tensors)
            rest[str(key)] = sub_rest
        else:
            rest[str(key)] = value
    return tensors, rest


def unflatten(tensors: Weights, rest: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The inverse of :func:`flatten` (keys come back as strings)."""
    tree: dict[str, Any] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix + "/"):
            continue
        node = tree
        *parents, leaf = name[len(prefix) + 1 :].split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    _merge(tree, rest)
    return tree


def _merge(tree: dict[str, Any], rest: dict[str, Any]) -> None:
    for key, value in rest.items():
        if isinstance(value, dict):
            _merge(tree.setdefault(key, {}), value)
        else:
            tree[key] = value


def save_run_state(run_dir: Path, state: RunState) -> Path:
    """Write ``RUN_DIR/checkpoint.safetensors`` atomically (temporary file, fsync, rename); a
    failed write (a full disk) leaves the previous one and raises ``WriteError`` naming it."""
    # weights and node records are flat name -> tensor maps whose names may hold "/"
    weights = {f"weights/{k}": v for k, v in state.weights.items()}
    nodes = {
        f"nodes/{node}/{record}/{name}": t
        for node, records in state.nodes.items()
        for record, tensors in records.items()
        for name, t in tensors.items()
    }
    algorithm, algorithm_rest = flatten(state.algorithm, "algorithm")
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "round": str(state.round),
        "algorithm": json.dumps(algorithm_rest),
        "devices": json.dumps(state.devices),
        "elapsed_seconds": repr(state.elapsed_seconds),
        "code": code_digest(),
    }
    path = Path(run_dir) / CHECKPOINT_FILE
    with writing(path, SafetensorError):
        # A private directory, not a temporary file: safetensors (>= 0.7) itself writes through
        # a ".tmpXXXXXX" file beside its target, which a kill would otherwise leave in the run dir.
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_FILE}-", dir=run_dir))
        try:
            tmp = tmp_dir / CHECKPOINT_FILE
            save_file(_writable({**weights, **algorithm, **nodes}), tmp, metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _writable(tensors: Weights) -> Weights:
    """``tensors`` as safetensors can write them, copying only what it cannot write as it is:
    a non-contiguous tensor, or one whose storage an earlier one already uses."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        storage = t.untyped_storage().data_ptr()
        if not t.is_contiguous() or (storage in seen and t.numel()):
            t = t.contiguous().clone()
        seen.add(storage)
        out[name] = t
    return out


def read_rounds(run_dir: Path, last: int) -> list[dict]:
    """The metrics records of rounds 0..``last`` from ``metrics.jsonl`` (a later round, or a
    line a kill cut short, is what a crash left after the checkpoint: dropped)."""
    path = Path(run_dir) / METRICS_FILE
    by_round: dict[int, dict] = {}
    lines = path.read_text().splitlines() if path.is_file() else []
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break  # the last line, cut short by a kill
            raise HFedMoEError(f"--resume: '{path}' line {n + 1} is not JSON") from None
        if record["round"] <= last:
            by_round[record["round"]] = record
    if missing := [r for r in range(last + 1) if r not in by_round]:
        raise HFedMoEError(
            f"--resume: '{path}' lacks round {missing[0]}, which the checkpoint has passed"
        )
    return [by_round[r] for r in range(last + 1)]


def read_header(run_dir: Path) -> dict[str, str]:
    """The checkpoint's metadata, without its tensors; a clear error if it is not a usable
    checkpoint of this format."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise HFedMoEError(
            f"--resume: '{run_dir}' has no {CHECKPOINT_FILE} (not a run directory, or the run "
            "stopped before its first round was checkpointed)"
        )
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise HFedMoEError(f"--resume: '{path}' is not a readable checkpoint ({exc})") from None
    if missing := [k for k in HEADER_KEYS if k not in meta]:
        raise HFedMoEError(f"--resume: '{path}' lacks '{missing[0]}' (not a checkpoint)")
    if meta["format_version"] not in ("1", str(FORMAT_VERSION)):
        raise HFedMoEError(
            f"--resume: '{path}' has format version {meta['format_version']}, expected "
            f"{FORMAT_VERSION}"
        )
    return meta


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_FILE).is_file()


def load_run_state(run_dir: Path) -> RunState:
    """Read the last complete round's state (and its metrics records, from ``metrics.jsonl``
    or, in a format-1 checkpoint, from its header); a clear error if there is none."""
    meta = read_header(run_dir)
    path = Path(run_dir) / CHECKPOINT_FILE
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise HFedMoEError(f"--resume: '{path}' is not a readable checkpoint ({exc})") from None
    nodes: dict[int, dict[str, Weights]] = {}
    try:
        for key, t in tensors.items():
            if key.startswith("nodes/"):
                _, node, record, name = key.split("/", 3)
                nodes.setdefault(int(node), {}).setdefault(record, {})[name] = t
        return RunState(
            round=int(meta["round"]),
            weights={
                k.removeprefix("weights/"): t for k, t in tensors.items() if k[:8] == "weights/"
            },
            algorithm=unflatten(tensors, json.loads(meta["algorithm"]), "algorithm"),
            nodes=nodes,
            devices=json.loads(meta["devices"]),
            rounds=(
                json.loads(meta["rounds"])
                if "rounds" in meta
                else read_rounds(run_dir, int(meta["round"]))
            ),
            elapsed_seconds=float(meta["elapsed_seconds"]),
        )
    except (ValueError, KeyError) as exc:  # a malformed header value or tensor name
        raise HFedMoEError(f"--resume: '{path}' is not a readable checkpoint ({exc})") from None
