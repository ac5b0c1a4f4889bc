# Two commands for a fresh machine: `make run` and `make test` (README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled

.PHONY: run test peers ohif lint typecheck bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

## Start Ray, the HTTP API on 127.0.0.1:8000 and (with no node configured) three simulated PACS.
run: $(VENV)/.installed
	$(BIN)/spanner run

## OHIF's viewer on http://127.0.0.1:3000 against `make run`'s DICOMweb front (docs/dicomweb-ohif.md).
ohif: $(VENV)/.installed peers
	$(BIN)/spanner ohif

## Install the real peers (Debian's orthanc and dcmtk) and check the services the tests talk to.
peers:
	bash scripts/install-peers.sh

## Everything the tests need, then the tests.
test: $(VENV)/.installed-test peers
	$(BIN)/ruff check spanner serve_app actors cluster scp simulator cli tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

## Benchmarks at full size (about 25 minutes); results in benchmarks/results/ (JSON, markdown, PNG).
bench: $(VENV)/.installed-bench peers
	$(BIN)/python -m benchmarks.fanout
	$(BIN)/python -m benchmarks.fanout --archives orthanc --nodes 1,4,16,64
	$(BIN)/python -m benchmarks.merge
	$(BIN)/python -m benchmarks.throughput
	$(BIN)/python -m benchmarks.orthanc
	$(BIN)/python -m benchmarks.dicomweb
	$(BIN)/python -m benchmarks.dicomweb_wado
	$(BIN)/python -m benchmarks.retrieval

## The same, small (under 3 minutes on a quiet machine); results in benchmarks/results/*-quick.*
bench-quick: $(VENV)/.installed-bench peers
	$(BIN)/python -m benchmarks.fanout --quick
	$(BIN)/python -m benchmarks.fanout --quick --archives orthanc
	$(BIN)/python -m benchmarks.merge --quick
	$(BIN)/python -m benchmarks.throughput --quick
	$(BIN)/python -m benchmarks.orthanc --quick
	$(BIN)/python -m benchmarks.dicomweb --quick
	$(BIN)/python -m benchmarks.dicomweb_wado --quick
	$(BIN)/python -m benchmarks.soak --quick
	$(BIN)/python -m benchmarks.retrieval --quick

lint: $(VENV)/.installed-test
	$(BIN)/ruff check spanner serve_app actors cluster scp simulator cli tests benchmarks

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
