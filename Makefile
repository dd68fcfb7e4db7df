# Two commands for a new user:  `make demo` (set up, then train the built-in toy)
# and `make test` (set up, then run the test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.inductor_cache

.PHONY: setup build demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt

setup: $(BIN)/python build

build: $(BIN)/python
	$(BIN)/pip install -q -e . --no-build-isolation --no-deps

demo: setup
	$(BIN)/adpo-train

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m bench loss

clean:
	rm -rf build *.egg-info adpo_kernels/*.so adpo_kernels/_build_info.json .pytest_cache
