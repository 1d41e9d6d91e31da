"""MoE layer and training-step benchmark: `make bench` (or `python -m bench.moe_layer`).

Measures on this machine, in one run (ratios are what matter; absolute times vary):

1. the dense fp32 matmul rate (torch.mm, n = 1024 and 2048): the ceiling to compare against;
2. forward + backward of one MoE layer at SmolLM2-135M's FFN size (H=576, I=1536, SwiGLU,
   E=8 experts, 1024 tokens) with 1 expert, top-k=2 and all 8 experts per token, each with the
   reference loop over experts and with the grouped path (``model.expert_compute``), versus the
   equivalent dense FFN; achieved GFLOP/s counts 3 x forward FLOPs for forward + backward;
3. a training step of the default MoE model (MiniLM upcycled, E=8, top-2, layers 3-5; batch
   16 x 64 tokens) as the fraction of experts updated varies, with HFedMoE's backward-only
   mode (``ExpertModel.update_only``): forward, backward and optimizer time separately;
4. the same step with and without activation checkpointing (``train.activation_checkpointing``):
   its time and the activations the forward pass keeps.

All cases of a table are timed round-robin (case A, B, C, A, B, C, ...) and summarised by
their median, so that drifts of this shared machine's speed hit every case alike. The matmul
peak is the best of all its repeats. Prints Markdown tables; docs/BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from hfedmoe.foundation.config import ModelConfig
from hfedmoe.model import ExpertModel, build_classifier
from hfedmoe.model.moe import GatedExpertFFN, MoEFeedForward
from hfedmoe.training.optimizer import ExpertAdamW


def interleaved(cases: dict, repeats: int, warmup: int = 2) -> dict[object, list[float]]:
    """Seconds of every repeat of every case, timed round-robin."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[object, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def matmul_rate(repeats: int) -> dict[int, float]:
    """Best GFLOP/s of an n x n fp32 matmul."""
    mats = {n: (torch.randn(n, n), torch.randn(n, n)) for n in (1024, 2048)}
    cases = {n: (lambda a=a, b=b: a @ b) for n, (a, b) in mats.items()}
    times = interleaved(cases, 4 * repeats)
    return {n: 2 * n**3 / min(t) / 1e9 for n, t in times.items()}


def moe_layer_table(repeats: int, peak: float) -> list[str]:
    H, I, E, N = 576, 1536, 8, 1024  # noqa: E741 (the legend's names)
    torch.manual_seed(0)
    x = torch.randn(N, H)
    flops_per_expert_token = 2 * 3 * H * I  # gate, up and down projections

    def fwd_bwd(module: nn.Module) -> Callable[[], None]:
        def run() -> None:
            module(x.clone().requires_grad_(True)).sum().backward()
            module.zero_grad(set_to_none=True)

        return run

    cases: dict[str, tuple[int, nn.Module]] = {
        "dense FFN": (1, GatedExpertFFN(H, I, nn.functional.silu))
    }
    for label, k in [("MoE, 1 expert active", 1), ("MoE, top-k = 2", 2), ("MoE, all 8", E)]:
        block = MoEFeedForward([GatedExpertFFN(H, I, nn.functional.silu) for _ in range(E)], H, k)
        with torch.no_grad():
            block.gate.weight.normal_(0, 1.0)
            if label == "MoE, 1 expert active":  # every token to expert 0
                block.gate.weight.zero_()
                block.gate.weight[0] = x.mean(0) * 100
        cases[label] = (k, block)
        # the same block with model.expert_compute = "grouped" (one torch._grouped_mm per
        # projection; "auto" takes it on CUDA only)
        grouped = copy.deepcopy(block)
        grouped.expert_compute = "grouped"
        cases[f"{label}, grouped"] = (k, grouped)
    times = interleaved({label: fwd_bwd(m) for label, (_, m) in cases.items()}, repeats)
    t_dense = statistics.median(times["dense FFN"])
    rows = [
        "| layer | experts per token | fwd+bwd ms | GFLOP/s | of matmul peak | vs dense |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, (k, _) in cases.items():
        seconds = statistics.median(times[label])
        gflops = 3 * N * k * flops_per_expert_token / seconds / 1e9
        rows.append(
            f"| {label} | {k} | {seconds * 1e3:.1f} | {gflops:.1f} | {gflops / peak:.0%} | "
            f"{seconds / t_dense:.2f}x |"
        )
    return rows


def _default_step() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The default MoE model (MiniLM upcycled: E=8, top-2, layers 3-5) and a batch of 16 x 64
    random tokens, the same for every table that times a training step."""
    model = build_classifier(
        ModelConfig(num_experts=8, top_k=2, moe_layers=[3, 4, 5]), tuple("abcde"), seed=0
    )
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (16, 64), generator=g),
        "attention_mask": torch.ones(16, 64, dtype=torch.long),
        "labels": torch.randint(0, 5, (16,), generator=g),
    }
    return model, batch


def training_step_table(repeats: int) -> list[str]:
    model, batch = _default_step()
    model.eval()  # no dropout: identical work in every repeat
    em = ExpertModel(model)
    opt = ExpertAdamW(model.parameters(), em.expert_axes(), lr=1e-5, weight_decay=0.01)
    L, E = em.shape
    phases: dict[float, tuple[list[float], list[float], list[float]]] = {}

    def step(fraction: float) -> Callable[[], None]:
        active = torch.zeros(L, E, dtype=torch.bool)
        active[:, : round(fraction * E)] = True
        phases[fraction] = ([], [], [])

        def run() -> None:
            t0 = time.perf_counter()
            loss = model(**batch).loss
            t1 = time.perf_counter()
            with em.update_only(active):
                loss.backward()
            rows = em.expert_grad_mask(active)
            t2 = time.perf_counter()
            opt.step(rows)
            opt.zero_grad()
            t3 = time.perf_counter()
            for phase, seconds in zip(phases[fraction], (t1 - t0, t2 - t1, t3 - t2), strict=True):
                phase.append(seconds)

        return run

    interleaved({f: step(f) for f in (0.0, 0.25, 0.5, 0.75, 1.0)}, repeats, warmup=1)
    med = {f: [statistics.median(p[-repeats:]) for p in ph] for f, ph in phases.items()}
    rows = [
        "| experts updated | forward ms | backward ms | optimizer ms | step ms | backward vs all |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for fraction, (f, b, o) in med.items():
        rows.append(
            f"| {fraction:.0%} | {f * 1e3:.0f} | {b * 1e3:.0f} | {o * 1e3:.0f} | "
            f"{(f + b + o) * 1e3:.0f} | {b / med[1.0][1]:.2f} |"
        )
    return rows


def checkpointing_table(repeats: int) -> list[str]:
    """A training step of the default model with and without activation checkpointing
    (``train.activation_checkpointing``), in training mode as clients train (dropout on: the
    recomputation replays it), every expert updated."""
    from hfedmoe.budget.cost_model import saved_activation_bytes
    from hfedmoe.training.loop import activation_checkpointing

    model, batch = _default_step()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(checkpointing: bool) -> Callable[[], None]:
        def run() -> None:
            model.train()
            with activation_checkpointing(model, checkpointing):
                model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()

        return run

    times = interleaved({c: step(c) for c in (False, True)}, repeats, warmup=1)
    rows = [
        "| activation checkpointing | step ms | vs off | activations saved (MB) |",
        "| --- | ---: | ---: | ---: |",
    ]
    off = statistics.median(times[False])
    for checkpointing in (False, True):
        seconds = statistics.median(times[checkpointing])
        saved = saved_activation_bytes(model, batch, checkpointing=checkpointing)
        rows.append(
            f"| {'on' if checkpointing else 'off'} | {seconds * 1e3:.0f} | {seconds / off:.2f}x "
            f"| {saved / 1e6:.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="MoE layer and training-step benchmark")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}, {os.cpu_count()} CPUs\n"
    )
    rates = matmul_rate(args.repeats)
    print("| matmul n | best GFLOP/s |\n| ---: | ---: |")
    for n, r in rates.items():
        print(f"| {n} | {r:.1f} |")
    peak = max(rates.values())
    print("\nMoE layer at SmolLM2's FFN size (H=576, I=1536, SwiGLU, E=8, 1024 tokens), fp32:\n")
    print("\n".join(moe_layer_table(args.repeats, peak)))
    print(
        "\nTraining step of the default MiniLM-MoE (E=8, top-2, layers 3-5), batch 16 x 64, "
        "backward-only mode:\n"
    )
    print("\n".join(training_step_table(args.repeats)))
    print("\nThe same model and batch in training mode, activation checkpointing off and on:\n")
    print("\n".join(checkpointing_table(args.repeats)))


if __name__ == "__main__":
    main()
