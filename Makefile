# annbatch-nb: `make demo` and `make test` are the two commands a newcomer needs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.12 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
DEMO_DIR ?= demo-data
# Debian's chromium: the browser test drives it with Playwright (never `playwright install`: no downloads).
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test lint format notebooks bench clean venv lab chromium

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

# Tutorials: executed by `make test` (nbval compares every cell's saved output), re-executed and saved by
# `make notebooks`.
NOTEBOOKS := $(wildcard notebooks/0*.ipynb)

test: lint $(CHROMIUM)
	$(BIN)/python -m pytest --nbval --nbval-current-env $(NOTEBOOKS) tests

notebooks: $(VENV)/.installed-test
	$(BIN)/python -m jupyter nbconvert --to notebook --execute --inplace $(NOTEBOOKS)

$(CHROMIUM):
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

chromium: $(CHROMIUM)

# JupyterLab on notebooks/ with the project's kernel (the venv's python registered as `python3` in the venv).
lab: $(VENV)/.installed-test
	$(BIN)/python -m ipykernel install --sys-prefix --display-name "Python 3 (annbatch-nb)" >/dev/null
	$(BIN)/python -m jupyter lab --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

# Side-by-side benchmark against annbatch (see benchmarks/README.md); e.g. make bench BENCH_ARGS="--repeats 5"
bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/bench_shuffle.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
