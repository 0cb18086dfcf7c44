# The README's two commands: `make demo` (the main job on the default model) and `make test`.
# Each creates .venv if missing, installs torch==2.13.0 first (a local CPU wheel here), keeps
# it pinned through constraints.txt, then installs graphopt with its dependencies.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The main job: the best int8 recipe (the most accurate int8 at ORT's quantizer speed, measured in
# benchmarks/quantization.py), set beside the fp32 artifact it replaces.
RECIPE ?= int8-mixed
BASELINE ?= fp32
OUT ?= out/minilm-$(RECIPE)
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
	$(BIN)/graphopt compress --model minilm --recipe $(RECIPE) --baseline $(BASELINE) -o $(OUT)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
