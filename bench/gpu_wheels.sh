#!/usr/bin/env bash
# The Python packages bench/gpu.sh needs beyond a GPU machine's CUDA PyTorch image (torch,
# transformers, peft, numpy are there; nothing can be fetched there), as wheels for its
# Python 3.12, into .whl/ (ignored by git: `echo /.whl/ >> .git/info/exclude`). 3.6 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 flwr-datasets==0.6.1 tomli_w==1.2.0
ls .whl
