# Every target bootstraps its own virtualenv, so a fresh checkout needs nothing but python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/sidecar: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

run: $(BIN)/sidecar
	$(BIN)/sidecar up

test: $(BIN)/sidecar
	$(BIN)/ruff check sidecar plugins tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(BIN)/sidecar
	$(BIN)/python benchmarks/extproc.py

clean:
	rm -rf $(VENV) build *.egg-info
