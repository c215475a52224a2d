# The two commands a newcomer needs: `make run` and `make test`.
# Both work on a fresh Debian machine with only Python 3.11+ (and python3-venv).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# What running needs (the package) and what testing needs on top (.[dev]).
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test require lint typecheck bench clean wheel lock

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
	 SMTPGATE_ALLOW_ROOT=1 $(BIN)/smtpgate serve --config examples/gateway.yaml

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

## wheel: dist/smtpgate-VERSION-py3-none-any.whl, the package alone (its templates
## and static files inside); deploy it with the exact versions of requirements.lock:
##   pip install --no-deps -r requirements.lock dist/smtpgate-*.whl && pip check
wheel: | $(BIN)/python
	rm -rf dist build
	$(BIN)/pip wheel --quiet --no-deps -w dist .

## lock: requirements.lock, the exact versions of what running needs, from a clean
## venv with only the package installed (no dev tools); commit it with pyproject.toml
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet .
	{ echo "# The exact versions of smtpgate's runtime dependencies. Regenerate: make lock"; \
	  echo "# Deploy: pip install --no-deps -r requirements.lock smtpgate-*.whl && pip check"; \
	  .lock-venv/bin/pip freeze --exclude smtpgate; } > requirements.lock
	rm -rf .lock-venv build

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis dist build .lock-venv
