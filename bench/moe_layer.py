"""MoE layer and training-step benchmark: `make bench` (or `python -m bench.moe_layer`).

Measures on this machine, in one run (ratios are what matter; absolute times vary):

1. the dense fp32 matmul rate (torch.mm, n = 1024 and 2048): the ceiling to compare against;
2. forward + backward of one MoE layer at SmolLM2-135M's FFN size (H=576, I=1536, SwiGLU,
   E=8 experts, 1024 tokens) with 1 expert, top-k=2 and all 8 experts per token, versus the
   equivalent dense FFN; achieved GFLOP/s counts 3 x forward FLOPs for forward + backward;
3. a training step of the default MoE model (MiniLM upcycled, E=8, top-2, layers 3-5; batch
   16 x 64 tokens) as the fraction of experts updated varies, with HFedMoE's backward-only
   mode (``ExpertModel.update_only``): forward, backward and optimizer time separately.

Prints Markdown tables; docs/BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from hfedmoe.config import ModelConfig
from hfedmoe.model import ExpertModel, build_classifier
from hfedmoe.model.moe import GatedExpertFFN, MoEFeedForward
from hfedmoe.optim import MaskedAdamW


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(repeats: int) -> dict[int, float]:
    rates = {}
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        rates[n] = 2 * n**3 / median_seconds(lambda a=a, b=b: a @ b, repeats) / 1e9
    return rates


def moe_layer_table(repeats: int, peak: float) -> list[str]:
    H, I, E, N = 576, 1536, 8, 1024  # noqa: E741 (the paper's and the legend's names)
    torch.manual_seed(0)
    dense = GatedExpertFFN(H, I, nn.functional.silu)
    x = torch.randn(N, H)
    flops_per_expert_token = 2 * 3 * H * I  # gate, up, down projections

    def fwd_bwd(module: nn.Module) -> Callable[[], None]:
        def run() -> None:
            inp = x.clone().requires_grad_(True)
            module(inp).sum().backward()
            module.zero_grad(set_to_none=True)

        return run

    rows = [
        "| layer | experts per token | fwd+bwd ms | GFLOP/s | of matmul peak | vs dense |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    t_dense = median_seconds(fwd_bwd(dense), repeats)
    cases = [
        ("dense FFN", 1, None),
        ("MoE, 1 expert active", 1, "one"),
        ("MoE, top-k = 2", 2, "topk"),
        ("MoE, all 8 experts", E, "all"),
    ]
    for label, k, mode in cases:
        if mode is None:
            seconds = t_dense
        else:
            block = MoEFeedForward(
                [GatedExpertFFN(H, I, nn.functional.silu) for _ in range(E)], H, k
            )
            with torch.no_grad():
                block.gate.weight.normal_(0, 1.0)
                if mode == "one":  # every token to expert 0
                    block.gate.weight.zero_()
                    block.gate.weight[0] = x.mean(0) * 100
            seconds = median_seconds(fwd_bwd(block), repeats)
        gflops = 3 * N * k * flops_per_expert_token / seconds / 1e9
        rows.append(
            f"| {label} | {k} | {seconds * 1e3:.1f} | {gflops:.1f} | "
            f"{gflops / peak:.0%} | {seconds / t_dense:.2f}x |"
        )
    return rows


def training_step_table(repeats: int) -> list[str]:
    cfg = ModelConfig(num_experts=8, top_k=2, moe_layers=[3, 4, 5])
    model = build_classifier(cfg, tuple("abcde"), seed=0)
    model.eval()  # no dropout: identical work in every repeat
    em = ExpertModel(model)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (16, 64), generator=g),
        "attention_mask": torch.ones(16, 64, dtype=torch.long),
        "labels": torch.randint(0, 5, (16,), generator=g),
    }
    opt = MaskedAdamW(model.parameters(), lr=1e-5)
    rows = [
        "| experts updated | forward ms | backward ms | optimizer ms | step ms | backward vs all |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    L, E = em.shape
    results = {}
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        active = torch.zeros(L, E, dtype=torch.bool)
        active[:, : round(fraction * E)] = True
        fwd, bwd, step = [], [], []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            loss = model(**batch).loss
            t1 = time.perf_counter()
            with em.update_only(active):
                loss.backward()
            em.expert_grad_mask(active)
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if i:  # the first is a warm-up
                fwd.append(t1 - t0), bwd.append(t2 - t1), step.append(t3 - t2)
        results[fraction] = [statistics.median(x) for x in (fwd, bwd, step)]
    full_bwd = results[1.0][1]
    for fraction, (f, b, o) in results.items():
        rows.append(
            f"| {fraction:.0%} | {f * 1e3:.0f} | {b * 1e3:.0f} | {o * 1e3:.0f} | "
            f"{(f + b + o) * 1e3:.0f} | {b / full_bwd:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n"
    )
    rates = matmul_rate(args.repeats)
    print("| matmul n | GFLOP/s |\n| ---: | ---: |")
    for n, r in rates.items():
        print(f"| {n} | {r:.1f} |")
    peak = max(rates.values())
    print("\nMoE layer at SmolLM2 FFN size (H=576, I=1536, SwiGLU, E=8, 1024 tokens), fp32:\n")
    print("\n".join(moe_layer_table(args.repeats, peak)))
    print(
        "\nTraining step of the default MiniLM-MoE (E=8, top-2, layers 3-5), batch 16 x 64, "
        "backward-only mode:\n"
    )
    print("\n".join(training_step_table(args.repeats)))


if __name__ == "__main__":
    main()
