# The two commands a newcomer needs: `make run` and `make test`.
# Both work on a fresh Debian machine with only Python 3.11+ (and python3-venv).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# What running needs (the package) and what testing needs on top (.[dev]).
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test require lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(RUN_STAMP)

## run: the gateway on 127.0.0.1:2525 relaying to a recording sink on 127.0.0.1:2526;
## each says when it is listening (the gateway logs `gateway ready` once bound)
run: $(RUN_STAMP)
	@mkdir -p var
	@$(BIN)/smtpgate sink --listen 127.0.0.1:2526 --dir var/sink & \
	 sink=$$!; trap 'kill $$sink 2>/dev/null' EXIT INT TERM; \
	 $(BIN)/smtpgate serve --config examples/gateway.yaml

## test: what the tests need, lint, type check, then the whole test suite
test: $(TEST_STAMP) require lint typecheck
	$(BIN)/pytest

## require: one line naming what is missing (Debian packages, root), if anything
require:
	@sh tests/require.sh

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

typecheck: $(TEST_STAMP)
	$(BIN)/mypy src

bench: $(TEST_STAMP)
	$(BIN)/python benchmarks/inbound.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
