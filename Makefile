# Kleis: `make run` serves, `make test` tests. Both set everything up on a fresh clone.
PY    ?= python3
VENV  := .venv
BIN   := $(VENV)/bin
ARGS  ?=
# pytest-xdist worker processes (this machine has 2 cores); WORKERS=0 runs in one process.
WORKERS ?= 2

.PHONY: help run test lint fmt check bench clean
.DEFAULT_GOAL := help

help:                                   ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 10

# The venv is rebuilt only when the requirement files change.
$(VENV)/.ok: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

run: $(VENV)/.ok                        ## serve on 127.0.0.1:8787 (creates config.toml on first start)
	$(BIN)/python kleis.py serve --config config.toml

test: $(VENV)/.ok                       ## run the whole suite on WORKERS processes; pass ARGS="-k usage -x"
	$(BIN)/pytest -n $(WORKERS) $(ARGS)

check: $(VENV)/.ok                      ## validate config.toml and the providers, then exit
	$(BIN)/python kleis.py check --config config.toml

lint: $(VENV)/.ok                       ## ruff check and ruff format --check (what CI enforces)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(VENV)/.ok                        ## ruff format, then ruff check --fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(VENV)/.ok                      ## benchmark Kleis against a bare pass-through (needs wrk)
	@command -v wrk >/dev/null || (apt-get install -y wrk >/dev/null 2>&1 || echo "wrk not installed; using the Python load generator")
	$(BIN)/python tests/bench.py $(ARGS)
	$(BIN)/python tests/bench_parts.py

clean:                                  ## remove the venv and caches (keeps config.toml and kleis.db)
	rm -rf $(VENV) .pytest_cache .ruff_cache bench-results
	find . -name __pycache__ -prune -exec rm -rf {} +
