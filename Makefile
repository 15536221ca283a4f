# Every target bootstraps its own virtualenv, so a fresh checkout needs nothing but python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CODE := sidecar plugins tests benchmarks

.PHONY: run test lint format bench clean

$(BIN)/sidecar: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# xds-protos ships an old copy of opentelemetry-proto's modules over the real package's files (which
	# one wins depends on install order); put the real ones back so the OTLP exporter can import them.
	$(BIN)/pip install -q --force-reinstall --no-deps "opentelemetry-proto==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	@touch $@

run: $(BIN)/sidecar
	$(BIN)/sidecar up

# ruff (lint and format check), the import contracts of docs/architecture.md, then mypy --strict.
lint: $(BIN)/sidecar
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/lint-imports
	$(BIN)/mypy

# lint, then the whole suite with a coverage figure for the sidecar package.
test: lint
	$(BIN)/pytest --cov=sidecar --cov-report=term:skip-covered

format: $(BIN)/sidecar
	$(BIN)/ruff check --fix $(CODE)
	$(BIN)/ruff format $(CODE)

bench: $(BIN)/sidecar
	$(BIN)/python benchmarks/extproc.py
	$(BIN)/python benchmarks/inprocess.py

clean:
	rm -rf $(VENV) build *.egg-info .coverage
