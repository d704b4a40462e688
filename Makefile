# Two entry points that do all set-up themselves on a fresh machine:
#   make train   -> venv + install, then train tiny-cpu on the Python stdlib and print a sample
#   make test    -> venv + install with test extras, then the test suite (on both cores, pytest-xdist)
# TORCH_SPEC pins the torch wheel; on this project's CPU machines torch==2.13.0 is a CPU build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# -n 2: the suite on both cores. Measured with benchmarks/pytest_xdist.py (interleaved rounds; 2-core AMD EPYC
# shared with other jobs, load ~8-10; 2026-12-04, commit 9bb80b3): on 6 heavier files (--files test_low_memory.py,
# test_features.py,test_galore.py,test_eval.py,test_act_quant.py,test_sft.py --rounds 2) one process 201 s vs
# -n 2 180 s: -n 2 1.12x faster; on 6 light files (the script's default subset, --rounds 3) 51 s vs 91 s: -n 2
# 0.56x, the two workers' start-up outweighs a short run. The full suite was not timed (the machine was not idle).
PYTEST_ARGS ?=

.PHONY: train test lint install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

train: install
	$(BIN)/nanochat-train train $(ARGS)

test: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)
	ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -n 2 -m "numerics and not native_only" $(PYTEST_ARGS)
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -n 2 -m "numerics and not native_only" $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build dist *.egg-info
