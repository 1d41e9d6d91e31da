"""bench/scale.py at tiny size: one client's training measured as the GPU run will measure it,
and the 1B shapes the GPU run builds are the sizes docs/BENCHMARKS.md names."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import transformers as T

from bench import scale


@pytest.mark.parametrize(
    ("kind", "mode", "precision"),
    # the native LoRA bf16 case is slow for CI time: the upcycled one covers the measurement
    [("upcycled", "full", "fp32"), pytest.param("native", "lora", "bf16", marks=pytest.mark.slow)],
)
def test_one_case_measures_a_clients_training(kind, mode, precision):
    row = scale.run_case(kind, mode, precision, "tiny", "cpu")
    assert row["trained_parameters"] + row["frozen_parameters"] == row["parameters"]
    assert (row["frozen_parameters"] > 0) == mode.startswith("lora")
    assert row["trained_bytes"] == 4 * row["trained_parameters"]  # fp32 master weights
    assert 0 < row["active_parameters"] < row["parameters"]  # top-2 of 4 experts
    assert row["activation_bytes"] > 0 and row["tokens_per_second"] > 0
    (line,) = scale.table([row], peak_tflops=1.0)[2:]
    assert line.startswith(f"| {kind} | {mode} | {precision} |") and line.endswith("% |")


def test_lora_on_a_bf16_base_holds_2_bytes_per_frozen_parameter():
    """The bf16 base's case: 2 bytes per frozen parameter as held (its norms, a few hundred
    bytes here, stay fp32), 4 per trained (the adapters stay fp32); what the client holds per
    frozen parameter beyond activations is measured."""
    row = scale.run_case("upcycled", "lora-bf16", "bf16", "tiny", "cpu")
    assert 0 < 2 * row["frozen_parameters"] < row["frozen_bytes"] < 2.02 * row["frozen_parameters"]
    assert row["trained_bytes"] == 4 * row["trained_parameters"] > 0
    assert row["bytes_per_frozen_parameter"] is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_case_on_cuda_measures_the_allocators_peak(precision):
    row = scale.run_case("upcycled", "full", precision, "tiny", "cuda")
    assert row["device"] != "cpu" and row["peak_increase_bytes"] > 0
    # weights, gradients and two AdamW moments: 16 bytes a trained parameter, activations apart
    assert row["bytes_per_trained_parameter"] >= 16


@pytest.mark.parametrize(("kind", "parameters"), [("native", 1.525e9), ("upcycled", 1.100e9)])
def test_the_1b_shapes_are_the_sizes_the_docs_name(kind, parameters):
    """The dense or native model before upcycling, counted on the meta device (no memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = T.AutoConfig.from_pretrained(scale._write_config(kind, "1b", Path(tmp)))
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=1e-3)


def test_the_upcycled_model_trains_with_grouped_experts_and_checkpointing_as_asked():
    row = scale.run_case("upcycled", "full", "fp32", "tiny", "cpu", "grouped", checkpointing=True)
    assert row["expert_compute"] == "grouped" and row["activation_checkpointing"] is True
    assert row["tokens_per_second"] > 0 and row["activation_bytes"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_on_cuda_compute_what_the_loop_computes(dtype):
    """On a GPU, model.expert_compute = "auto" takes the grouped path wherever the kernel runs
    (bf16 on an H100 at least) and agrees with the loop, output and gradients."""
    from torch import nn

    from hfedmoe.model.moe import GatedExpertFFN, MoEFeedForward

    torch.manual_seed(0)
    experts = [GatedExpertFFN(64, 128, nn.functional.silu) for _ in range(8)]
    block = MoEFeedForward(experts, 64, 2).cuda()
    with torch.no_grad():
        block.gate.weight.normal_(0, 1)
    x = torch.randn(4, 32, 64, device="cuda")
    results, grouped = [], []
    for mode in ("loop", "auto"):
        block.expert_compute = mode
        block.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            grouped.append(block._grouped(x.reshape(-1, 64)))
            y = block(x)
        y.float().square().sum().backward()
        results.append((y.detach().float(), [p.grad for p in block.parameters()]))
    assert grouped[0] is False
    if dtype == torch.bfloat16:
        assert grouped[1] is True
    (y_loop, g_loop), (y_auto, g_auto) = results
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y_auto, y_loop, atol=tol, rtol=tol)
    for a, b in zip(g_auto, g_loop, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)
