# Threadline developer commands. `make run` and `make test` are the two that matter:
# each installs what it needs into .venv first.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install peer-install run test lint typecheck check bench bench-quick clean

install: $(VENV)/.installed conformance/node_modules/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The Durable Streams conformance suite (Node), run by tests/test_conformance.py.
conformance/node_modules/.installed: conformance/package-lock.json
	npm ci --prefix conformance --no-audit --no-fund --loglevel=error
	touch $@

## The Durable Streams reference server (Node) for comparison benchmarks: bench/peer/server.mjs
peer-install:
	npm ci --prefix bench/peer --no-audit --no-fund --loglevel=error

## Run the server on the embedded stack (Postgres + SeaweedFS + chDB) under ./.threadline
run: install
	$(BIN)/threadline dev

## Run the whole test suite against a real embedded stack
test: install
	$(BIN)/pytest

## Benchmarks (their own embedded stack; figures to stdout and bench/results/)
bench: install
	$(BIN)/python bench/sessions_api.py
	$(BIN)/python bench/list_replication.py
	$(BIN)/python bench/streams.py

## Benchmarks in quick mode (about a minute)
bench-quick: install
	$(BIN)/python bench/sessions_api.py --quick
	$(BIN)/python bench/list_replication.py --quick
	$(BIN)/python bench/streams.py --quick

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
