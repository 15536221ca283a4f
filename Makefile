# Every target bootstraps its own virtualenv, so a fresh checkout needs nothing but python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CODE := sidecar plugins tests benchmarks

.PHONY: run test lint format bench clean

# The in-process backend's native module is compiled by setup.py at install: a change to either rebuilds it.
NATIVE := setup.py $(wildcard sidecar/inprocess/native/*.c sidecar/inprocess/native/*.h)

# A new pyproject.toml (or no virtualenv yet) installs everything; a change to the native module alone only
# recompiles it (an editable install without its dependencies: seconds, not the whole environment).
$(BIN)/sidecar: pyproject.toml $(NATIVE)
	@if [ ! -e $@ ] || [ pyproject.toml -nt $@ ]; then $(MAKE) --no-print-directory environment; \
	else $(BIN)/pip install -q -e . --no-deps; fi
	@touch $@

.PHONY: environment
environment:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# xds-protos ships an old copy of opentelemetry-proto's modules over the real package's files (which
	# one wins depends on install order); put the real ones back so the OTLP exporter can import them.
	$(BIN)/pip install -q --force-reinstall --no-deps "opentelemetry-proto==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"

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
