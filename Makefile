# The two commands a newcomer needs: `make run` and `make test`.
# Both work on a fresh Debian machine with only Python 3.11+ installed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: the gateway on 127.0.0.1:2525 relaying to a recording sink on 127.0.0.1:2526
run: $(STAMP)
	@mkdir -p var
	@$(BIN)/smtpgate sink --listen 127.0.0.1:2526 --dir var/sink & \
	 sink=$$!; trap 'kill $$sink 2>/dev/null' EXIT INT TERM; \
	 echo "gateway on 127.0.0.1:2525 and [::1]:2525; received mail lands in var/sink/"; \
	 $(BIN)/smtpgate serve --config examples/gateway.yaml

## test: lint, type check, then the whole test suite
test: $(STAMP) lint typecheck
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy src

bench: $(STAMP)
	$(BIN)/python benchmarks/inbound.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
