# annbatch-nb: `make demo` and `make test` are the two commands a newcomer needs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.12 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
DEMO_DIR ?= demo-data

.PHONY: demo test lint format notebooks bench clean venv

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), f"annbatch-nb needs Python >= 3.12, found {sys.version}"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Re-install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/annbatch-nb demo --dir $(DEMO_DIR)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check annbatch_nb tests benchmarks
	$(BIN)/ruff format --check annbatch_nb tests benchmarks

format: $(VENV)/.installed-test
	$(BIN)/ruff format annbatch_nb tests benchmarks
	$(BIN)/ruff check --fix annbatch_nb tests benchmarks

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
