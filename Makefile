# The two commands of a fresh clone (lightning-hydra-template's convention): `make train` and `make test`.
# Both create .venv on first use with the tested pins (constraints.txt); on a machine without an NVIDIA GPU, torch
# comes from PyTorch's CPU index, never as the several-GB CUDA build PyPI's default wheel is.
#   make train ARGS="model=scratch trainer.max_epochs=5"     # any Hydra overrides
#   make test-quick                                           # a first check, under a minute

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH := $(shell sed -n 's/^torch==//p' constraints.txt)
ARGS ?=
# a few seconds each: models against each other, data, schedules, the documented commands; no training run
QUICK := tests/test_models.py tests/test_data.py tests/test_schedules.py tests/test_gru_cpu.py tests/test_docs.py

.PHONY: train test test-quick lint setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "Error: gruexp needs Python 3.10 or newer; $(PYTHON) is $$($(PYTHON) -V 2>&1): set PYTHON=python3.1x"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -e /proc/driver/nvidia/version ] || nvidia-smi -L >/dev/null 2>&1; then \
		echo "an NVIDIA GPU: torch $(TORCH) with CUDA, from PyPI"; \
	else \
		echo "no NVIDIA GPU: torch $(TORCH)'s CPU build from $(TORCH_CPU_INDEX)"; \
		$(PY) -m pip install -q --retries 1 --timeout 30 --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH)" || \
			{ echo "Error: torch $(TORCH)'s CPU build could not be installed from $(TORCH_CPU_INDEX): set TORCH_CPU_INDEX to a mirror, or install it into $(VENV) yourself"; exit 2; }; \
	fi
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $@

train: setup
	$(PY) -m gruexp.train $(ARGS)

test: setup
	$(PY) -m pytest -q -n 2

test-quick: setup
	$(PY) -m pytest -q -n 2 $(QUICK)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
