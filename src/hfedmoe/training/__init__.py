"""Local training and evaluation, shared by every algorithm: the loop, the optimizer that can
leave experts untouched, the peak-memory probe, evaluation and the device the work runs on."""

from hfedmoe.training.device import on_device, resolve_device, to_device
from hfedmoe.training.evaluation import (
    EvalResult,
    choice_logprobs,
    continuation_logprobs,
    evaluate,
    evaluate_choices,
    loss_gradient,
)
from hfedmoe.training.loop import StepHooks, TrainResult, autocast_for, train_local
from hfedmoe.training.memory import PeakMemory
from hfedmoe.training.objective import task_loss
from hfedmoe.training.optimizer import ExpertAdamW, MaskedAdamW

__all__ = [
    "EvalResult",
    "ExpertAdamW",
    "MaskedAdamW",
    "PeakMemory",
    "StepHooks",
    "TrainResult",
    "autocast_for",
    "choice_logprobs",
    "continuation_logprobs",
    "evaluate",
    "evaluate_choices",
    "loss_gradient",
    "on_device",
    "resolve_device",
    "task_loss",
    "to_device",
    "train_local",
]
