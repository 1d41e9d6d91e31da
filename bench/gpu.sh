#!/usr/bin/env bash
# What only a GPU machine can show, in one command (docs/BENCHMARKS.md, "Real model sizes"):
# bench.scale's tests (on CUDA too), then bench.scale at 1B+ sizes in fp32 and bf16, full fine-tuning and LoRA;
# then the upcycled model with the reference loop of experts (the grouped path's speed-up) and
# with activation checkpointing (its memory).
# Run from the repository root on a machine whose python3 holds CUDA PyTorch, transformers and
# PEFT, with the wheels of bench/gpu_wheels.sh in .whl/; results go to $OUT (default: .).
#   bash bench/gpu.sh                 # about 10 minutes on an H100
set -uo pipefail
OUT=${OUT:-.}
PEAK=${PEAK_TFLOPS:-989}  # dense bf16 peak of an H100 SXM or H200 (NVIDIA's data sheets)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__,
  'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
# the tiny cases on the GPU first (tests/test_device.py needs Flower's wheels too: not carried)
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_scale_bench.py \
  2>&1 | tail -n 15 | tee "$OUT/tests.txt"
python3 -m bench.scale --size 1b --device cuda --peak-tflops "$PEAK" --out "$OUT/scale.json" \
  2>&1 | tee "$OUT/scale.md"
# the upcycled block's reference loop against the grouped path the run above took on CUDA
# (model.expert_compute = auto): the same case, the experts computed one product per expert
python3 -m bench.scale --size 1b --device cuda --peak-tflops "$PEAK" --models upcycled \
  --modes full --precisions bf16 --expert-compute loop --out "$OUT/scale-loop.json" \
  2>&1 | tee "$OUT/scale-loop.md"
# and with activation checkpointing (train.activation_checkpointing): the memory it saves at 1B+
python3 -m bench.scale --size 1b --device cuda --peak-tflops "$PEAK" --models upcycled \
  --modes full --precisions bf16 --activation-checkpointing --out "$OUT/scale-ckpt.json" \
  2>&1 | tee "$OUT/scale-ckpt.md"
