# `make dev` runs the demo, `make test` runs every test; both set up everything they need.
# Any Python from 3.10 to 3.14: `make dev PYTHON=python3.12`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two stamps: `make dev` installs the package with the demo's extra only; `make test` adds the
# test tools (the `test` extra includes `dev`, so it marks both installed).
DEV_STAMP := $(VENV)/.installed-dev
TEST_STAMP := $(VENV)/.installed-test
# The tests' second SQS server. It pins a botocore that aioboto3 cannot use, so it gets a venv of
# its own inside .venv (dagster_taskiq_cancel.local_sqs.MINISTACK_VENV finds it there).
MINISTACK := 1.5.33

.PHONY: dev test lint format chromium postgres clean bench

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 14))' || \
		(echo "$(PYTHON) is not Python 3.10 to 3.14: run make PYTHON=python3.12 (or another)"; exit 1)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	test -x $(VENV)/ministack/bin/python || $(BIN)/python -m venv $(VENV)/ministack
	$(VENV)/ministack/bin/pip install --quiet ministack==$(MINISTACK)
	touch $@ $(DEV_STAMP)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(TEST_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Debian's Chromium for the browser test (Playwright's own browser download does not work here).
chromium:
	test -x /usr/bin/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

# Debian's PostgreSQL server binaries: the tests start a private cluster from them (no service).
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql)

test: $(TEST_STAMP) chromium postgres lint
	$(BIN)/pytest -p no:cacheprovider -ra --durations=40

dev: $(DEV_STAMP)
	$(BIN)/dagster-taskiq-cancel dev

# Figures beside the peers' (not part of `make test`): prints a table, writes
# benchmarks/results/latest.json. `python -m benchmarks --help` for --size long, --sqs, --only.
# The fleet scenario always runs on a private Postgres cluster.
bench: $(TEST_STAMP) postgres
	$(BIN)/python -m benchmarks

# Everything but the demo's config: the venv, the demo's runs, test output.
clean:
	rm -rf $(VENV) .dagster_home test-output
	find dagster_home -mindepth 1 -not -name dagster.yaml -delete
