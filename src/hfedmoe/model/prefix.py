"""The transformer blocks before a model's first MoE block, run once and replayed.

Passes that differ only in what happens at the MoE blocks (the selection analysis removes
experts from routing and compares losses, five passes per client) compute the same hidden
states up to the first MoE block. On SmolLM2-MoE, whose MoE blocks are the last 4 of 30, that
is 26/30 of every pass. :class:`BlockPrefix` keeps what the last block before the first MoE
block returns, batch by batch, in a recorded pass, and hands it back in later passes over the
same batches in the same order, without running those blocks. The blocks after it see the same
inputs, so every later pass's outputs are the same bit for bit.

Written by hand: transformers' key/value cache reuses a prefix of positions, not of layers.
It holds one hidden-state tensor per batch (SmolLM2: 32 x 96 x 576 floats, 7 MB).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from hfedmoe.model.experts import ExpertModel


def blocks_before_first_moe(model: nn.Module) -> list[nn.Module]:
    """The blocks of the stack holding the first MoE block that come before it ("model.layers"
    for "model.layers.26.mlp": blocks 0-25); [] when it is the first block or sits in no stack
    (nn.ModuleList) of numbered blocks."""
    layers = ExpertModel(model).layers
    if not layers:
        return []
    target = layers[0].name
    for name, module in model.named_modules():
        head = f"{name}." if name else ""
        if not isinstance(module, nn.ModuleList) or not target.startswith(head):
            continue
        index = target[len(head) :].split(".")[0]
        if index.isdigit():
            return list(module)[: int(index)]
    return []


class BlockPrefix:
    """Record the prefix's output per batch in one pass (:meth:`recording`), replay it in later
    passes over the same batches (:meth:`replaying`). A model whose first block is an MoE
    block has no prefix: both are then plain passes."""

    def __init__(self, model: nn.Module):
        self.blocks = blocks_before_first_moe(model)
        self._outputs: list[Any] = []
        self._shapes: list[torch.Size] = []  # what entered the prefix, to check a replay by
        self._cursor = 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """A pass run as it is, keeping what the prefix's last block returns for each batch."""
        self._outputs.clear()
        self._shapes.clear()
        if not self.blocks:
            yield
            return

        def enter(module: nn.Module, args: Any, kwargs: Any) -> None:
            self._shapes.append(_first_tensor(args, kwargs).shape)

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            self._outputs.append(_copied(output))  # as returned, before a later block writes

        handles = [
            self.blocks[0].register_forward_pre_hook(enter, with_kwargs=True),
            self.blocks[-1].register_forward_hook(keep),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """A pass over the recorded pass's batches, in its order, with the prefix's blocks
        returning the recorded outputs instead of running; every recorded batch must be
        replayed."""
        if not self.blocks:
            yield
            return
        self._cursor = 0
        before = [block.__dict__.get("forward") for block in self.blocks]
        for j, block in enumerate(self.blocks):
            block.forward = self._stand_in(first=j == 0, last=j == len(self.blocks) - 1)
        try:
            yield
        finally:
            for block, forward in zip(self.blocks, before, strict=True):
                del block.forward
                if forward is not None:
                    block.forward = forward
        if self._cursor != len(self._outputs):
            raise RuntimeError(
                f"BlockPrefix: replayed {self._cursor} of {len(self._outputs)} recorded batches"
            )

    def _stand_in(self, first: bool, last: bool) -> Callable[..., Any]:
        """A block's forward during a replay: the recorded output of the batch at the cursor
        (only the last block's is read on, so only it is copied and moves the cursor on)."""

        def forward(*args: Any, **kwargs: Any) -> Any:
            if first:
                if self._cursor >= len(self._outputs):
                    raise RuntimeError(
                        "BlockPrefix: a replayed pass has more batches than the one recorded"
                    )
                shape, recorded = _first_tensor(args, kwargs).shape, self._shapes[self._cursor]
                if shape != recorded:
                    raise RuntimeError(
                        f"BlockPrefix: replayed batch {self._cursor} has shape {tuple(shape)}, "
                        f"recorded {tuple(recorded)}"
                    )
            output = self._outputs[self._cursor]
            if last:
                self._cursor += 1
                return _copied(output)  # a later block may write into what it is given
            return output

        return forward


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block is called with: its first tensor argument."""
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


def _copied(output: Any) -> Any:
    """A block's output (a tensor or a tuple of them), its tensors copied."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_copied(o) for o in output)
    return output
