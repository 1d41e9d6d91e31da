"""Where training and evaluation run (``train.device``): the model moves there for the block and
is back on the CPU afterwards, where selection, masking, aggregation and the wire expect it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from hfedmoe.foundation.errors import HFedMoEError


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device: ``auto`` is cuda when torch sees one, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise HFedMoEError(f"train.device: '{name}', but torch sees no such CUDA device")
    return device


@contextlib.contextmanager
def on_device(model: nn.Module, name: str) -> Iterator[torch.device]:
    """The block runs with ``model`` on the device ``name`` (``train.device``); the model is
    back on the CPU afterwards, where aggregation and the wire expect it."""
    device = resolve_device(name)
    model.to(device)
    try:
        yield device
    finally:
        model.to("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
