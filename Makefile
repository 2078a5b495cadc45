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

# Every benchmark's figures (README, "Performance"): about 7 minutes on this project's idle
# 2 cores, most of it the naive training step (~17 s per stage, timed 6 times in each).
# OpenMP threads that spin while waiting made steps up to 3x slower on a shared machine;
# passive waiting costs next to nothing on an idle one. Set OMP_WAIT_POLICY to override.
bench: $(STAMP)
	$(BIN)/python benchmarks/simulate.py
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python benchmarks/train_step.py
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python benchmarks/inference.py

# The paper's comparison (iterU-Net, baseline, both ablations), iterU-Net on the regression
# prior and the regression model, with the `cpu` preset, trained on 1,500 cases and tested
# on at least 125 lesions: about 3 hours on a 2-core CPU (README, "make experiment").
experiment: $(STAMP)
	$(BIN)/dcesynth experiment runs/experiment --preset cpu

# Offline install for a GPU server with its own torch: every other runtime dependency as
# wheels, and dcesynth's own, in $(WHEELHOUSE)/. For another Python than this venv's:
# `make wheelhouse PYVER=3.12`, for x86-64 Linux with glibc >= GLIBC_MINOR (2.28: RHEL 8,
# Ubuntu 20.04 and later); the wheels are then those of every manylinux tag up to it.
# pytest comes too, for scripts/gpu-check.sh to run the tests on the server.
WHEELHOUSE ?= wheelhouse
PYVER ?=
GLIBC_MINOR ?= 28
WHEEL_PLATFORMS = manylinux1 manylinux2010 manylinux2014 \
	$(foreach minor,$(shell seq 5 $(GLIBC_MINOR)),manylinux_2_$(minor))
WHEEL_TARGET = $(if $(PYVER),--python-version $(PYVER) --implementation cp \
	$(foreach tag,$(WHEEL_PLATFORMS),--platform $(tag)_x86_64))

wheelhouse: $(STAMP)
	rm -rf $(WHEELHOUSE)
	$(BIN)/python scripts/wheelhouse_requirements.py $(WHEELHOUSE) $(if $(PYVER),--python-version $(PYVER))
	$(BIN)/pip download --quiet --only-binary=:all: $(WHEEL_TARGET) --no-deps \
		-d $(WHEELHOUSE) -r $(WHEELHOUSE)/no-deps.txt
	$(BIN)/pip download --quiet --only-binary=:all: $(WHEEL_TARGET) \
		-d $(WHEELHOUSE) -r $(WHEELHOUSE)/requirements.txt -c $(WHEELHOUSE)/constraints.txt
	$(BIN)/pip download --quiet --only-binary=:all: $(WHEEL_TARGET) -d $(WHEELHOUSE) pytest
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w $(WHEELHOUSE) .

clean:
	rm -rf $(VENV) runs
