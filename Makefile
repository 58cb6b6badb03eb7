# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/drsite demo

# the suite in 4 workers (pytest-xdist): the end-to-end tests mostly wait on real processes and
# timers, so 4 run side by side on 2 cores; a module's tests stay in one worker, and the longest
# modules start first (tests/conftest.py; xdist would reorder them by their number of tests)
test: $(STAMP)
	$(BIN)/pytest -q -n 4 --dist loadgroup --no-loadscope-reorder

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache drsite-demo
