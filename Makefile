# `make dev` runs the demo, `make test` runs every test; both set up everything they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tests' second SQS server. It pins a botocore that aioboto3 cannot use, so it gets a venv of
# its own inside .venv (dagster_taskiq_cancel.local_sqs.MINISTACK_VENV finds it there).
MINISTACK := 1.5.33

.PHONY: dev test lint format chromium postgres clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	test -x $(VENV)/ministack/bin/python || $(BIN)/python -m venv $(VENV)/ministack
	$(VENV)/ministack/bin/pip install --quiet ministack==$(MINISTACK)
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Debian's Chromium for the browser test (Playwright's own browser download does not work here).
chromium:
	test -x /usr/bin/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

# Debian's PostgreSQL server binaries: the tests start a private cluster from them (no service).
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql)

test: $(STAMP) chromium postgres lint
	$(BIN)/pytest -p no:cacheprovider -ra --durations=40

dev: $(STAMP)
	$(BIN)/dagster-taskiq-cancel dev

# Figures beside the peers' (not part of `make test`): prints a table, writes
# benchmarks/results/latest.json. `python -m benchmarks --help` for --size long, --sqs, --only.
bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .dagster_home test-output
