# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck check bench bench-peers bench-peers-quick clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[redis,postgres,s3,cli,http,metrics,otel]" --group dev
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

test: $(STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench
	$(BIN)/mypy
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py

# Substantial beside DBOS and absurd on one PostgreSQL (bench/peers/); the peers live in a
# virtualenv of their own, pinned by bench/peers/requirements.txt. QUICK=1: a smoke run.
PEERS := bench/peers/.venv
PEERS_STAMP := $(PEERS)/.installed

$(PEERS_STAMP): bench/peers/requirements.txt
	$(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q -r bench/peers/requirements.txt
	touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python bench/peers/driver.py $(if $(QUICK),--quick)

bench-peers-quick:
	$(MAKE) bench-peers QUICK=1

clean:
	rm -rf $(VENV) $(PEERS) .substantial .pytest_cache .mypy_cache .ruff_cache
