"""The budget cost model against measurements: peak memory and step FLOPs of a client.

    .venv/bin/python -m bench.budget            # MiniLM-MoE (the default model)
    .venv/bin/python -m bench.budget --smollm2  # also SmolLM2-MoE, causal LM (slower)
    .venv/bin/python -m bench.budget --peers    # FLUX and FFT-MoE on a small device instead

For each number of experts trained per batch it prints the cost model's prediction of the
memory training adds (gradients, optimizer state, activations; the weights are already
resident) next to the peak RSS increase measured in a fresh process, and the predicted step
FLOPs next to the FLOPs torch's FlopCounterMode counts for one step. docs/BUDGETS.md holds the
table of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from hfedmoe.budget import build_cost_model, probe_batch
from hfedmoe.federation.workload import client_model, label_names
from hfedmoe.foundation.config import ExperimentConfig, validate
from hfedmoe.model.experts import ExpertModel
from tests.support.calibration import MEASURE_SMALL_DEVICE, count_step_flops

MINILM = {
    "model": {"moe_layers": [3, 4, 5], "max_length": 64},
    "train": {"local_steps": 3},
}
SMOLLM2 = {
    "model": {
        "name_or_path": "SmolLM2-135M-Instruct",
        "moe_layers": [20, 25, 29],
        "max_length": 64,
    },
    "data": {"task": "language-modeling"},
    "train": {"local_steps": 3, "batch_size": 8},
}

MEASURE = """
import json, sys, torch
from hfedmoe.foundation.config import validate
from tests.support.calibration import measure_client_memory
torch.set_num_threads(2)
print(json.dumps(measure_client_memory(validate(json.loads(sys.argv[1])), int(sys.argv[2]))))
"""


def measure_memory(raw: dict, experts: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(raw), str(experts)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rows(raw: dict, label: str) -> list[str]:
    cfg: ExperimentConfig = validate(raw)
    model = client_model(cfg, label_names(cfg))
    costs = build_cost_model(model, cfg)
    batch = probe_batch(model, cfg)
    L, E = ExpertModel(model).shape
    gen = torch.Generator().manual_seed(0)
    out = []
    for c in sorted({0, max(1, L * E // 4), L * E // 2, L * E}):
        active = torch.zeros(L * E, dtype=torch.bool)
        active[torch.randperm(L * E, generator=gen)[:c]] = True
        counted = count_step_flops(model, batch, active.view(L, E))
        predicted_flops = costs.predict(c).step_flops
        m = measure_memory(raw, c)
        measured, predicted = m["measured_bytes"], m["predicted_bytes"]
        out.append(
            f"| {label} | {c}/{L * E} | {predicted / 2**20:,.0f} | "
            f"{(measured or 0) / 2**20:,.0f} | {(measured or 0) / predicted:.2f} | "
            f"{predicted_flops / 1e9:.1f} | {counted / 1e9:.1f} | {counted / predicted_flops:.3f} |"
        )
        print(out[-1], flush=True)
    return out


#: glibc's default heap, and one whose mmap threshold stays at its initial 128 KiB
HEAPS = {"glibc default": {}, "mmap threshold 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def peer_rows() -> None:
    print(
        "| method | heap | weights held MiB (predicted) | predicted extra MiB | "
        "measured extra MiB | ratio | training s |"
    )
    print("|---|---|---|---|---|---|---|")
    for algorithm in ("flux", "fftmoe", "hfedmoe"):
        for heap, env in HEAPS.items():
            proc = subprocess.run(
                [sys.executable, "-c", MEASURE_SMALL_DEVICE, algorithm, "8"],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, **env},
            )
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            measured, predicted = m["measured_bytes"] or 0, m["predicted_bytes"]
            print(
                f"| {algorithm} | {heap} | {m['held_bytes'] / 2**20:,.1f} "
                f"({m['held_predicted_bytes'] / 2**20:,.1f}) | {predicted / 2**20:,.0f} | "
                f"{measured / 2**20:,.0f} | {measured / predicted:.2f} | "
                f"{m['train_seconds']:.1f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="also measure SmolLM2-MoE")
    parser.add_argument("--peers", action="store_true", help="FLUX and FFT-MoE, small device")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.peers:
        peer_rows()
        return
    print(
        "| model | experts trained per batch | predicted extra MiB | measured extra MiB | "
        "ratio | predicted step GFLOP | counted step GFLOP | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows(MINILM, "MiniLM-MoE, batch 16 x 64")
    if args.smollm2:
        rows(SMOLLM2, "SmolLM2-MoE (LM), batch 8 x 64")


if __name__ == "__main__":
    main()
