# Entry points (see README "Quickstart"): `make demo`, `make test`, `make quickstart`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
QUICK := runs/quickstart

.PHONY: install demo quickstart test test-all lint bench clean

$(BIN)/omotool: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/omotool

demo: install
	$(BIN)/omotool demo

quickstart: install
	$(BIN)/python scripts/make_tiny_models.py $(QUICK)
	$(BIN)/omotool delta $(QUICK)/base $(QUICK)/sft -o $(QUICK)/tau --overwrite
	$(BIN)/omotool train --config recipes/train/tiny-dpo-ondare.yaml

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q -m "not slow"

test-all: lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/bench_delta.py

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
