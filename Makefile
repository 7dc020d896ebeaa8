# The two commands: `make run` (serve on 127.0.0.1:8000) and `make test` (the whole suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
# pip's stamp files: reinstall only when pyproject.toml changes.
STAMP      := $(VENV)/.installed
STAMP_DEV  := $(VENV)/.installed-dev

.PHONY: run test test-full bench-gateway clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is pinned to the CPU build that pip finds for torch==2.13.0 on CPU machines;
# on a GPU host install the CUDA build of the same version first.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP_DEV): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/sluice migrate
	$(VENV)/bin/sluice serve --host $(HOST) --port $(PORT)

test: $(STAMP_DEV)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-full: $(STAMP_DEV)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-gateway: $(STAMP_DEV)
	$(PY) -m loadtests.bench_gateway

clean:
	rm -rf $(VENV) sluice.db sluice.db-* .sluice
