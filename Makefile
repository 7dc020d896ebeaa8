# The two commands: `make run` (serve on 127.0.0.1:8000) and `make test` (the whole suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
# pip's stamp files: reinstall only when pyproject.toml changes.
STAMP      := $(VENV)/.installed
STAMP_DEV  := $(VENV)/.installed-dev

.PHONY: run test test-full lint-imports bench-gateway clean chromium

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

# The dashboard's browser tests drive Debian's Chromium (Playwright's own browsers are
# never downloaded).
chromium:
	@test -x /usr/bin/chromium || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP_DEV) chromium
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-full: $(STAMP_DEV) chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The architecture contracts in .importlinter: engine and gateway apart, no import cycles.
lint-imports: $(STAMP_DEV)
	$(VENV)/bin/lint-imports

bench-gateway: $(STAMP_DEV)
	$(PY) -m loadtests.bench_gateway

clean:
	rm -rf $(VENV) sluice.db sluice.db-* .sluice
