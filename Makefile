# One command to set up and run the demo, one to set up and run the tests.
# Both create ./.venv (torch CPU build first, then autoprune) if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.autoprune-installed

.PHONY: setup demo test test-all lint bench clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

## demo: set up, run the digits search (local Ray, SQLite, local MLflow store) and print its front
demo: $(STAMP)
	rm -rf runs/digits-cnn
	$(BIN)/autoprune run search_spaces/digits_cnn.yaml
	$(BIN)/autoprune front search_spaces/digits_cnn.yaml

## test: set up, start PostgreSQL (and install chromium) where possible, run the whole suite
test: $(STAMP)
	bash scripts/test.sh

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/latency_spread.py
