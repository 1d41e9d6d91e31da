"""Real model sizes: one client's local training, its memory and its speed, for full fine-tuning
and LoRA, fp32 and bf16, on two MoEs built with random weights.

    python -m bench.scale --size tiny                       # seconds on a CPU (the tests run it)
    python -m bench.scale --size 1b --device cuda --out scale.json   # a GPU machine, ~10 min

The two models (``SHAPES``):

* ``native``: a Mixtral-shaped MoE from a transformers config, its own fused experts, loaded by
  ``hfedmoe.model.hf.load_moe_model`` as a user's checkpoint would be;
* ``upcycled``: a Llama-shaped dense decoder from a transformers config, upcycled by this
  project (``build_causal_lm``: its MoE block, its backward-only masking) in its last layers.

Each case (model x full/LoRA x fp32/bf16) runs in a fresh child process, so one case's heap
cannot inflate the next one's peak, and is timed by ``hfedmoe.training.train_local`` itself,
the loop every client runs: one warm-up call of one step, then ``steps`` steps of ``batch`` x
``seq`` random tokens. Reported per case:

* parameters trained and frozen, and their bytes as held (fp32 master weights in both precisions;
  the ``lora-bf16`` mode holds the frozen base in bf16, ``model.frozen_dtype``, and runs in bf16
  only);
* the training loop's peak memory above the weights (``PeakMemory``: the CUDA allocator's peak,
  or the process's peak RSS on the CPU) and the activations one batch saves for the backward
  pass (autograd's saved-tensor hooks, under the same autocast); from them, the bytes each
  trained parameter costs beyond activations: (trained bytes + peak increase - activations) /
  trained parameters, 16 for fp32 weights, gradients and two AdamW moments; and what the
  client holds beyond activations per frozen (base) parameter: (frozen bytes + trained bytes +
  peak increase - activations) / frozen parameters, about 4 for an fp32 base and 2 for a bf16
  one, plus the adapters' share;
* tokens per second of the timed steps, and the model FLOPs utilisation 6 N T / (seconds x
  peak), N the active parameters per token (``ExpertModel.flops_per_token``'s forward / 2: every
  matmul weight a token passes, top-k experts of each MoE layer), against ``--peak-tflops`` (the
  card's dense bf16 peak: 989 for an H100 SXM or H200, by NVIDIA's data sheets; no MFU without
  it). 6 N counts weight gradients a frozen base does not compute, so LoRA's MFU is a
  convention, not the work done.

Prints a Markdown table (docs/BENCHMARKS.md records runs, with the machine) and, with --out, the
rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parent process stays free of torch
    from hfedmoe.foundation.config import LoraConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: model.expert_compute's choices (hfedmoe.model.moe.EXPERT_COMPUTE; not imported here, so that
#: the parent process stays free of torch)
EXPERT_COMPUTE = ("auto", "loop", "grouped")

#: model shapes by size: the native Mixtral-shaped MoE and the dense Llama to upcycle, and the
#: batch each step trains on
SHAPES: dict[str, dict] = {
    "tiny": {
        "native": dict(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, experts=4),
        "upcycled": dict(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, experts=4),
        "moe_layers": 1,  # the upcycled model's last layers made MoE
        "vocab": 256,
        "batch": 2,
        "seq": 16,
        "steps": 2,
    },
    "1b": {
        # 1.5 B parameters, 0.47 B per token (8 experts, top-2, every layer; embeddings in)
        "native": dict(hidden=1024, intermediate=3584, layers=16, heads=16, kv_heads=8, experts=8),
        # TinyLlama-shaped (1.1 B dense), its last 4 layers upcycled to 8 experts: 2.1 B
        # parameters, 1.2 B per token
        "upcycled": dict(
            hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, experts=8
        ),
        "moe_layers": 4,
        "vocab": 32000,
        "batch": 8,
        "seq": 512,
        "steps": 5,
    },
}
TOP_K = 2
KINDS = ("native", "upcycled")
MODES = ("full", "lora", "lora-bf16")  # lora-bf16: LoRA on a bf16 frozen base
PRECISIONS = ("fp32", "bf16")


def _write_config(kind: str, size: str, directory: Path) -> Path:
    """A transformers config.json for ``kind`` at ``size`` (no weights: the model is random)."""
    import transformers as T

    shapes = SHAPES[size]
    s, vocab, seq = shapes[kind], shapes["vocab"], shapes["seq"]
    common = dict(
        vocab_size=vocab,
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    if kind == "native":
        config = T.MixtralConfig(
            **common, num_local_experts=s["experts"], num_experts_per_tok=TOP_K
        )
    else:
        config = T.LlamaConfig(**common)
    path = directory / kind
    config.save_pretrained(path)
    return path


def _build(kind: str, size: str, mode: str, directory: Path, expert_compute: str = "auto"):
    from hfedmoe.foundation.config import LoraConfig
    from hfedmoe.model.frozen import hold_frozen_in
    from hfedmoe.model.hf import load_moe_model

    path = _write_config(kind, size, directory)
    lora = LoraConfig() if mode.startswith("lora") else None
    if kind == "native":
        model = load_moe_model(path, lora=lora, pretrained=False, seed=0)
    else:
        model = _upcycled(path, size, lora, expert_compute)
    if mode == "lora-bf16":
        hold_frozen_in(model)
    return model


def _upcycled(path: Path, size: str, lora: LoraConfig | None, expert_compute: str):
    from hfedmoe.foundation.config import ModelConfig
    from hfedmoe.model.upcycled import build_causal_lm

    s, layers = SHAPES[size]["upcycled"], SHAPES[size]["moe_layers"]
    cfg = ModelConfig(
        name_or_path=str(path),
        num_experts=s["experts"],
        top_k=TOP_K,
        moe_layers=list(range(s["layers"] - layers, s["layers"])),
        max_length=SHAPES[size]["seq"],
        lora=lora,
        expert_compute=expert_compute,
    )
    return build_causal_lm(cfg, seed=0, pretrained=False, model_dir=path)


def _data(size: str, rows: int):
    import numpy as np

    from hfedmoe.data.tokenized import TokenizedDataset

    shapes = SHAPES[size]
    rng = np.random.default_rng(0)
    ids = rng.integers(1, shapes["vocab"], size=(rows, shapes["seq"])).tolist()
    return TokenizedDataset(ids, np.zeros(rows, dtype=np.int64), 0, language_modeling=True)


def _activation_bytes(model, batch: dict, precision: str, device, checkpointing: bool) -> int:
    """What one batch's forward pass saves for backward, under the training's autocast (with
    activation checkpointing: what stays between the recomputed layers)."""
    from hfedmoe.budget.cost_model import saved_activation_bytes
    from hfedmoe.training.device import to_device

    model.to(device)
    try:
        return saved_activation_bytes(model, to_device(batch, device), precision, checkpointing)
    finally:
        model.to("cpu")


def run_case(
    kind: str,
    mode: str,
    precision: str,
    size: str,
    device_name: str,
    expert_compute: str = "auto",
    checkpointing: bool = False,
) -> dict:
    """One case, in this process: build the model, warm up, time ``steps`` steps, measure."""
    import numpy as np
    import torch

    from hfedmoe.foundation.config import TrainConfig
    from hfedmoe.model import ExpertModel
    from hfedmoe.training import train_local
    from hfedmoe.training.device import resolve_device

    if mode == "lora-bf16" and precision != "bf16":
        raise ValueError(f"mode 'lora-bf16' computes in bf16; got precision '{precision}'")
    shapes = SHAPES[size]
    device = resolve_device(device_name)
    with tempfile.TemporaryDirectory() as tmp:
        model = _build(kind, size, mode, Path(tmp), expert_compute)
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    forward, _ = ExpertModel(model).flops_per_token()
    batch, steps = shapes["batch"], shapes["steps"]
    data = _data(size, batch * (steps + 1))

    def train(n: int):
        cfg = TrainConfig(
            local_steps=n,
            batch_size=batch,
            lr=1e-5,
            device=device_name,
            precision=precision,
            activation_checkpointing=checkpointing,
        )
        return train_local(model, data, cfg, np.random.default_rng(0))

    train(1)  # warm-up: kernels, allocator pools, lazy inits
    result = train(steps)
    first = data.batch(list(range(batch)))
    activations = _activation_bytes(model, first, precision, device, checkpointing)
    trained_bytes = sum(p.numel() * p.element_size() for p in trained)
    increase = result.peak_memory_increase
    tokens_per_s = steps * batch * shapes["seq"] / result.seconds
    n_trained = sum(p.numel() for p in trained)
    frozen_bytes = sum(p.numel() * p.element_size() for p in frozen)
    n_frozen = sum(p.numel() for p in frozen)
    return {
        "model": kind,
        "mode": mode,
        "precision": precision,
        "size": size,
        # how the upcycled block computes its experts (model.expert_compute); native: its own
        "expert_compute": expert_compute if kind == "upcycled" else "native",
        "activation_checkpointing": checkpointing,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": sum(p.numel() for p in model.parameters()),
        "active_parameters": forward / 2,
        "trained_parameters": n_trained,
        "trained_bytes": trained_bytes,
        "frozen_parameters": n_frozen,
        "frozen_bytes": frozen_bytes,
        "peak_increase_bytes": increase,
        "activation_bytes": activations,
        "bytes_per_trained_parameter": None
        if increase is None or not n_trained
        else (trained_bytes + increase - activations) / n_trained,
        "bytes_per_frozen_parameter": None
        if increase is None or not n_frozen
        else (frozen_bytes + trained_bytes + increase - activations) / n_frozen,
        "tokens_per_second": tokens_per_s,
        "seconds": result.seconds,
        "steps": steps,
        "tokens_per_step": batch * shapes["seq"],
    }


def _child(kind: str, mode: str, precision: str, args: argparse.Namespace) -> dict:
    """``run_case`` in a fresh interpreter (its own heap and allocator)."""
    cmd = [sys.executable, "-m", "bench.scale", "--one", f"{kind}:{mode}:{precision}"]
    cmd += ["--size", args.size, "--device", args.device, "--expert-compute", args.expert_compute]
    cmd += ["--activation-checkpointing"] if args.activation_checkpointing else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": kind, "mode": mode, "precision": precision, "error": last}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def table(rows: list[dict], peak_tflops: float | None) -> list[str]:
    lines = [
        "| model | mode | precision | trained / frozen params (M) | peak above weights (MiB) "
        "| activations (MiB) | bytes per trained param | bytes per frozen param | tokens/s "
        "| MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['precision']} | {r['error']} |")
            continue
        per, base = r["bytes_per_trained_parameter"], r["bytes_per_frozen_parameter"]
        mfu = "-"
        if peak_tflops:
            used = 6 * r["active_parameters"] * r["tokens_per_second"]
            mfu = f"{used / (peak_tflops * 1e12):.1%}"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['precision']} "
            f"| {r['trained_parameters'] / 1e6:,.1f} / {r['frozen_parameters'] / 1e6:,.1f} "
            f"| {_mib(r['peak_increase_bytes'])} | {_mib(r['activation_bytes'])} "
            f"| {'-' if per is None else f'{per:.1f}'} | {'-' if base is None else f'{base:.1f}'} "
            f"| {r['tokens_per_second']:,.0f} | {mfu} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu", help="train.device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--models", default=",".join(KINDS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument(
        "--expert-compute", choices=EXPERT_COMPUTE, default="auto", help="model.expert_compute"
    )
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="train.activation_checkpointing: recompute each layer in the backward pass",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child's case
    args = parser.parse_args(argv)
    if args.one:
        kind, mode, precision = args.one.split(":")
        row = run_case(
            kind, mode, precision, args.size, args.device, args.expert_compute,
            args.activation_checkpointing,
        )  # fmt: skip
        print(json.dumps(row))
        return
    started = time.perf_counter()
    rows = [
        _child(kind, mode, precision, args)
        for kind in args.models.split(",")
        for mode in args.modes.split(",")
        for precision in args.precisions.split(",")
        if not (mode == "lora-bf16" and precision != "bf16")  # a bf16 base computes in bf16
    ]
    ckpt = " --activation-checkpointing" if args.activation_checkpointing else ""
    print(f"bench.scale --size {args.size} --expert-compute {args.expert_compute}{ckpt} on "
          f"{platform.node()} ({args.device}), "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    print("\n".join(table(rows, args.peak_tflops)))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
