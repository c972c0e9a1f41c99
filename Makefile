# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU wheel where no GPU is present (an unpinned torch pulls a multi-GB CUDA build).
TORCH_PIN ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev,dask,s3]"
	touch $(STAMP)

demo: setup
	$(BIN)/percival demo

test: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q tests
	tmp=$$(mktemp -d) && PREFECT_HOME=$$tmp/prefect TMPDIR=$$tmp $(BIN)/python -m pytest -q --nbmake notebooks; \
		rc=$$?; rm -rf $$tmp; exit $$rc

lint: setup
	$(BIN)/python -m ruff check .

bench: setup
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache
