# The README's two commands: `make demo` (the main job on the default model) and `make test`.
# Each creates .venv if missing, installs torch==2.13.0 first (a local CPU wheel here), keeps
# it pinned through constraints.txt, then installs graphopt with its dependencies.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/minilm-fp32
RECIPE ?= fp32
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e ".[test,hf]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/graphopt compress --model minilm --recipe $(RECIPE) -o $(OUT)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
