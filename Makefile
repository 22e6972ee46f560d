# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The venv is built from the committed lock (requirements-dev.lock) with uv; `make lock` refreshes it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV := VIRTUAL_ENV=$(VENV) $(BIN)/uv
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: demo test lint bench lock clean

$(STAMP): pyproject.toml requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install -q uv
	$(UV) pip sync -q --compile-bytecode requirements-dev.lock
	$(UV) pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/spine-ray demo

test: $(STAMP)
	$(BIN)/ruff check spine_ray tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check spine_ray tests benchmarks

# Re-resolve the dev dependency set for every platform and Python >= 3.10 (caps in constraints.txt).
lock:
	test -x $(BIN)/uv || { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); $(BIN)/pip install -q uv; }
	$(BIN)/uv pip compile pyproject.toml --extra dev -c constraints.txt --universal \
		--python-version 3.10 -o requirements-dev.lock -q

clean:
	rm -rf $(VENV) .pytest_cache
