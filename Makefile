# dcesynth: `make demo` runs the main job end to end, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench experiment wheelhouse clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dcesynth demo runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/simulate.py

# The paper's comparison (iterU-Net, baseline, both ablations) with the `cpu` preset.
experiment: $(STAMP)
	$(BIN)/dcesynth experiment runs/experiment --preset cpu --cases 40

clean:
	rm -rf $(VENV) runs
