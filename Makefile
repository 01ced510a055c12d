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
