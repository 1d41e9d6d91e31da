"""A frozen base held in bf16 (``model.frozen_dtype = "bf16"``).

The matrices no method trains (a LoRA or QLoRA base, FFT-MoE's dense parent: projections,
experts, embeddings and a tied head) take half their bytes in bf16: the 2 bytes per frozen
parameter of mixed-precision fine-tuning. A bf16 weight cannot meet an fp32 activation in a
product, so every forward pass of such a model runs under bf16 autocast, installed on the model
itself: a forward pre-hook enters autocast and a forward hook that runs even when the forward
pass raises leaves it. Evaluation, the cost model's probe, FLUX's probes and eq. (16)'s pass
thus need no code of their own. The model then computes the products bf16 autocast computes
on an fp32 base (which rounds each weight to bf16 for its product, too): the input embeddings'
output is widened to fp32, so the residual stream stays fp32, and 1-D parameters (norms,
biases; a few kB) stay fp32; the embeddings' values rounded to bf16 are the difference. What
trains (adapters, a classifier's head, trained routers) stays fp32, its gradients and
optimizer state too, and so does what travels (only trainable tensors travel
with a frozen base, ``hfedmoe.model.state``). The entered contexts are kept per model, so one
model runs one forward pass at a time (as every engine here does).

Written here because transformers and PEFT cast a whole model (``torch_dtype``), which would
train the adapters in bf16 as well and keep the residual stream in bf16.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

#: the attribute holding the autocast contexts a model's forward passes have entered
_ENTERED = "_hfedmoe_autocast"
_HANDLES = "_hfedmoe_autocast_hooks"


def hold_frozen_in(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
    """Cast ``model``'s frozen floating-point matrices to ``dtype`` and run its forward passes
    under ``dtype`` autocast from now on, the residual stream in fp32. 1-D parameters,
    quantised parameters (not floating point) and buffers (rotary frequencies, position ids)
    stay as they are; a tied weight is one parameter, cast once."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
                continue
            if p.dim() < 2:
                # kept fp32, but copied: a checkpoint's tensors are views of one memory-mapped
                # file, which a single tensor left on it keeps mapped, and every page the cast
                # read stays resident (the chat model's build: 0.54 GB)
                p.data = p.data.clone()
                continue
            p.data = p.data.to(dtype)
    autocast_forward(model, dtype)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Module) and _HANDLES not in vars(embeddings):
        setattr(embeddings, _HANDLES, [embeddings.register_forward_hook(_widen_output)])


def autocast_forward(model: nn.Module, dtype: torch.dtype) -> None:
    """Every forward pass of ``model`` runs under ``dtype`` autocast on the device of its
    parameters. Installed on the model and, for a PEFT model, on the model it wraps too (PEFT
    calls the inner model's ``forward`` directly, and callers may call the inner model)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in {id(m): m for m in (model, inner)}.values():
        if _ENTERED in vars(module):  # its own, not one PEFT forwards from the inner model
            continue
        setattr(module, _ENTERED, [])
        handles = [
            module.register_forward_pre_hook(functools.partial(_enter, dtype=dtype)),
            module.register_forward_hook(_leave, always_call=True),
        ]
        setattr(module, _HANDLES, handles)


def widen(model: nn.Module) -> None:
    """Undo :func:`hold_frozen_in`: every floating-point parameter fp32 (bf16 widens exactly)
    and the forward passes in fp32 again (an export, which merges adapters into the base)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
    for module in model.modules():
        for handle in vars(module).pop(_HANDLES, ()):
            handle.remove()
        vars(module).pop(_ENTERED, None)


def _widen_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.float() if output.is_floating_point() else output


def _enter(module: nn.Module, args: tuple, *, dtype: torch.dtype) -> None:
    device = next(module.parameters()).device.type
    context = torch.autocast(device, dtype=dtype)
    context.__enter__()
    vars(module)[_ENTERED].append(context)


def _leave(module: nn.Module, args: tuple, output: object) -> None:
    entered = vars(module)[_ENTERED]
    if entered:  # empty only if entering itself failed
        entered.pop().__exit__(None, None, None)
