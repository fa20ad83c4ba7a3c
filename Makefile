# `make demo` and `make test` work on a fresh machine: each creates .venv if needed and installs keel.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, pinned, so that nothing later resolves a plain `torch` to a multi-GB CUDA build
# (on this CPU machine 2.13.0 is a local CPU wheel; on a GPU machine it is PyPI's CUDA build).
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test bench gpu-check install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-base: $(BIN)/python setup.py
	$(PIP) install $(TORCH)
	$(PIP) install -e .
	touch $@

# deepspeed builds against the torch already installed (--no-build-isolation), so it comes after torch.
$(VENV)/.installed-test: $(VENV)/.installed-base setup.py
	$(PIP) install --no-build-isolation deepspeed==0.19.8
	$(PIP) install -e ".[test,triton,megatron]"
	touch $@

install: $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(BIN)/keel train configs/tiny.yaml $(ARGS)

# Two test files at a time: serially the suite kept the 2-core build machine ~30% busy (most tests wait on
# process start-up, Ray, and sockets), and took 33-37 minutes. A file's tests stay on one worker, so a
# module's Ray instance or trained runs are made once. TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# The prepared GPU check (benchmarks/gpu_check.py), about 8 minutes on an H100/H200. It installs nothing: on
# the bare GPU machine it runs from this tree with that machine's python3 (.venv does not travel there);
# here, with the venv's. ARGS=--dry-run runs every stage at tiny sizes on the CPU (CI does, in the tests).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(ARGS)

bench: $(VENV)/.installed-base
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info runs
