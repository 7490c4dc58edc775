# llava-cluster developer entry points. `make demo` and `make test` set everything up on a fresh clone.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEMO    ?= .demo

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel on this machine's disk; pyproject keeps a range for GPU images.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/llava-cluster demo --workdir $(DEMO)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check llava_cluster tests benchmarks

clean:
	rm -rf $(DEMO) .pytest_cache
