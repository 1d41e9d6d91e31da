"""The wire format: how algorithm objects travel in Flower messages. Keys are defined once here.

Server -> client (a ``train`` message)::

    ARRAYS  ArrayRecord   the weights the client downloads
    CONFIG  ConfigRecord  {ROUND: int, ...algorithm request config}

Client -> server (the reply)::

    ARRAYS   ArrayRecord   the weights the client uploads
    METRICS  MetricRecord  {NUM_EXAMPLES: |D_c|, PARTITION_ID: int, ...training metrics}
    STATS    ArrayRecord   algorithm statistics (e.g. per-expert usage), possibly empty

Before round 1, server -> client ``query.budget`` (empty) and client -> server::

    DEVICE   ConfigRecord  a :class:`DeviceReport`

Inside one process (the embedded engine, unless ``federation.check_wire``), the ARRAYS and
STATS records are :class:`TensorRecord`: the same messages, with the torch tensors carried by
reference instead of serialised into Flower's arrays. Such a record refuses to cross a wire.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from hfedmoe.algorithms import ClientUpdate, TrainRequest
from hfedmoe.foundation.config import ExperimentConfig
from hfedmoe.foundation.errors import ConfigError

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
STATS = "stats"
DEVICE = "device"
EVALUATION = "evaluation"  # a client's federated evaluation of the global model
BUDGET_QUERY = "query.budget"  # message type of the budget query
BUDGET_EXCEEDED = 4001  # error code of a reply from a client asked beyond its device
WORKER_DIED = 4002  # error code of the embedded engine's reply for a client whose process died
FAILURES = {BUDGET_EXCEEDED: "budget", WORKER_DIED: "worker-died"}  # error code -> failure

ROUND = "server-round"
MEMORY = "hfedmoe-memory"  # a node Context's record of its own tensors between rounds
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"

# run_config keys (Flower's per-run config, the same on every engine)
RUN_CONFIG = "hfedmoe-config"  # the validated ExperimentConfig as JSON
RUN_DIR = "run-dir"  # where the ServerApp writes results
RESUME = "resume"  # true: continue the run in RUN_DIR from its checkpoint (embedded only)
BY_REFERENCE = "by-reference"  # true: server and clients share a process (TensorRecord)


class TensorRecord(ArrayRecord):
    """An ArrayRecord that holds torch tensors by reference, for messages that stay inside one
    process: no serialisation, no copy. Written here because Flower's ArrayRecord always
    converts tensors into serialised arrays (two copies per message); Flower's Message and
    RecordDict carry this subclass unchanged. Crossing a wire would lose the tensors, so
    :meth:`deflate` refuses."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        self.tensors = dict(tensors)

    def to_torch_state_dict(self, keep_input: bool = True) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The tensors; ``keep_input=False`` also lets go of them (a consumed reply)."""
        tensors = dict(self.tensors)
        if not keep_input:
            self.tensors.clear()
        return tensors

    def deflate(self) -> bytes:
        raise RuntimeError("a by-reference TensorRecord cannot cross the wire (check_wire)")


def tensor_record(tensors: Mapping[str, torch.Tensor], by_reference: bool) -> ArrayRecord:
    return TensorRecord(tensors) if by_reference else ArrayRecord(dict(tensors))


def run_config(values: Mapping[str, object]) -> tuple[ExperimentConfig, Path]:
    """The experiment config and run directory of a run's Flower run config."""
    text, run_dir = str(values.get(RUN_CONFIG, "")), str(values.get(RUN_DIR, ""))
    if not text or not run_dir:
        raise ConfigError(
            f"run config: '{RUN_CONFIG}' and '{RUN_DIR}' must be set; start Flower runs with "
            "`hfedmoe flower CONFIG` (or `flwr run --run-config` with the file it writes)"
        )
    return ExperimentConfig.from_json(text), Path(run_dir)


def pack_request(
    request: TrainRequest, server_round: int, arrays: ArrayRecord | None = None
) -> RecordDict:
    """``arrays``: the request's weights already packed (by reference, or shared by many
    clients); by default they are serialised here."""
    return RecordDict(
        {
            ARRAYS: arrays if arrays is not None else ArrayRecord(request.weights),
            CONFIG: ConfigRecord({ROUND: server_round, **request.config}),
        }
    )


def unpack_request(content: RecordDict) -> tuple[TrainRequest, int]:
    config = dict(content.config_records[CONFIG])
    server_round = int(config.pop(ROUND))
    record = content.array_records[ARRAYS]
    # a serialised request is this client's own: its arrays are freed as they are converted;
    # a by-reference one is shared by the round's clients and is left as it is
    weights = record.to_torch_state_dict(keep_input=isinstance(record, TensorRecord))
    return TrainRequest(weights, config), server_round


def pack_update(update: ClientUpdate, partition_id: int, by_reference: bool = False) -> RecordDict:
    metrics = {NUM_EXAMPLES: update.num_examples, PARTITION_ID: partition_id, **update.metrics}
    return RecordDict(
        {
            ARRAYS: tensor_record(update.weights, by_reference),
            METRICS: MetricRecord(metrics),
            STATS: tensor_record(update.stats, by_reference),
        }
    )


def unpack_update(content: RecordDict) -> tuple[ClientUpdate, int]:
    """The update in a reply, which it consumes: the reply's arrays are let go as they are
    converted (Flower's RecordDict lives in a reference cycle until the garbage collector
    runs, so a reply that kept them would keep a whole update alive after its fold).

    Only the reply's shape is checked here (its records, |D_c| and partition id are integers);
    the metrics are passed on as they came, for ``validation`` to check against what the
    algorithm declares. A ValueError says what is wrong."""
    if extra := sorted(set(content) - {ARRAYS, METRICS, STATS}):
        raise ValueError(f"the reply holds a record '{extra[0]}' no reply has")
    arrays = content.array_records.get(ARRAYS)
    metrics_record = content.metric_records.get(METRICS)
    if arrays is None or metrics_record is None:
        raise ValueError(f"the reply lacks its '{ARRAYS}' or '{METRICS}' record")
    metrics = dict(metrics_record)
    num_examples = _integer(metrics.pop(NUM_EXAMPLES, None), NUM_EXAMPLES)
    partition_id = _integer(metrics.pop(PARTITION_ID, None), PARTITION_ID)
    stats_record = content.array_records.get(STATS)
    stats = {} if stats_record is None else stats_record.to_torch_state_dict(keep_input=False)
    update = ClientUpdate(
        weights=arrays.to_torch_state_dict(keep_input=False),
        num_examples=num_examples,
        metrics=metrics,
        stats=stats,
    )
    return update, partition_id


def _integer(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} is {value!r}, expected an integer")
    return value


@dataclass(frozen=True)
class DeviceReport:
    """A node's answer to the budget query."""

    partition_id: int
    tier: str  # "" = no tier: unlimited
    memory_bytes: int  # 0 = unlimited
    expert_budget: int  # C_budget(c); -1 = cannot even hold the model
    num_experts: int  # L x E
    num_partitions: int = 0  # as the node was told (node config); 0 = not reported
    num_examples: int = 0  # |D_c|, the size of its training data; 0 = not reported


#: the least each DeviceReport field may be (its type is its annotation's)
_DEVICE_MINIMA = {
    "partition_id": 0,
    "memory_bytes": 0,
    "expert_budget": -1,
    "num_experts": 1,
    "num_partitions": 0,
    "num_examples": 0,
}


def pack_device(report: DeviceReport) -> RecordDict:
    return RecordDict({DEVICE: ConfigRecord(asdict(report))})


def unpack_device(content: RecordDict) -> DeviceReport:
    """The node's :class:`DeviceReport`, every field checked: a ValueError names what is
    wrong (a node's answer is untrusted input like any reply)."""
    record = content.config_records.get(DEVICE) if isinstance(content, RecordDict) else None
    if record is None or set(content) != {DEVICE}:
        raise ValueError(f"malformed budget reply: expected one '{DEVICE}' record")
    values = dict(record)
    fields = {f.name for f in dataclasses.fields(DeviceReport)}
    if unknown := sorted(set(values) - fields):
        raise ValueError(f"malformed budget reply: unknown field '{unknown[0]}'")
    for name, value in values.items():
        if name == "tier":
            if not isinstance(value, str) or len(value) > 100:
                raise ValueError(f"malformed budget reply: tier is {value!r}, expected a name")
        elif isinstance(value, bool) or not isinstance(value, int) or value < _DEVICE_MINIMA[name]:
            raise ValueError(
                f"malformed budget reply: {name} is {value!r}, expected an integer >= "
                f"{_DEVICE_MINIMA[name]}"
            )
    try:
        return DeviceReport(**values)
    except TypeError as exc:  # a required field missing
        raise ValueError(f"malformed budget reply ({exc})") from None


def payload_bytes(content: RecordDict) -> int:
    """Bytes of array data in a message: what dominates the wire, the same on every engine
    (a :class:`TensorRecord` counts what its tensors would take serialised)."""
    total = 0
    for record in content.array_records.values():
        if isinstance(record, TensorRecord):
            total += sum(_serialised_bytes(t) for t in record.tensors.values())
        else:
            total += sum(len(array.data) for array in record.values())
    return total


def _serialised_bytes(t: torch.Tensor) -> int:
    """Flower serialises a tensor as a .npy file: its header, then its bytes."""
    return _npy_header_bytes(tuple(t.shape), t.dtype) + t.numel() * t.element_size()


@functools.lru_cache(maxsize=4096)
def _npy_header_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    descr = np.lib.format.dtype_to_descr(torch.empty(0, dtype=dtype).numpy().dtype)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.tell()


@dataclass(frozen=True)
class ClientEvaluation:
    """A client's evaluation of the global model on its own held-out share (eval.mode), and of
    its personal model where its algorithm keeps one (None: it keeps none yet)."""

    partition_id: int
    accuracy: float
    loss: float
    examples: int
    personal_accuracy: float | None = None
    personal_loss: float | None = None


def pack_evaluation(evaluation: ClientEvaluation) -> RecordDict:
    values = {k: v for k, v in asdict(evaluation).items() if v is not None}
    return RecordDict({EVALUATION: MetricRecord(values)})


def unpack_evaluation(content: RecordDict) -> ClientEvaluation:
    """The client's :class:`ClientEvaluation`, every field checked (an untrusted answer): a
    ValueError names what is wrong."""
    record = content.metric_records.get(EVALUATION) if isinstance(content, RecordDict) else None
    if record is None or set(content) != {EVALUATION}:
        raise ValueError(f"malformed evaluation: expected one '{EVALUATION}' record")
    values = dict(record)
    fields = [f.name for f in dataclasses.fields(ClientEvaluation)]
    required, personal = fields[:4], fields[4:]
    if not set(required) <= set(values) <= set(fields):
        raise ValueError(f"malformed evaluation: expected the fields {', '.join(required)}")
    if personal[0] in values or personal[1] in values:  # both or neither, in range
        for name, value in (("accuracy", "personal_accuracy"), ("loss", "personal_loss")):
            if value not in values:
                raise ValueError(f"malformed evaluation: {name} of the personal model missing")
    for name in ("partition_id", "examples"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"malformed evaluation: {name} is {value!r}, expected an integer")
    for prefix in ("", "personal_"):
        if prefix + "accuracy" not in values:
            continue
        accuracy, loss = values[prefix + "accuracy"], values[prefix + "loss"]
        if not isinstance(accuracy, int | float) or not 0 <= accuracy <= 1:
            raise ValueError(
                f"malformed evaluation: {prefix}accuracy is {accuracy!r}, expected 0 to 1"
            )
        if not isinstance(loss, int | float) or not math.isfinite(loss) or loss < 0:
            raise ValueError(
                f"malformed evaluation: {prefix}loss is {loss!r}, expected a finite >= 0"
            )

    def number(name: str) -> float | None:
        return float(values[name]) if name in values else None

    return ClientEvaluation(
        int(values["partition_id"]),
        float(values["accuracy"]),
        float(values["loss"]),
        int(values["examples"]),
        number("personal_accuracy"),
        number("personal_loss"),
    )
