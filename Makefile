# One entry point for set-up, tests and the demo. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ML_VENV := .venv-monailabel
ML_STAMP := $(ML_VENV)/.installed-stamp

.PHONY: install demo test test-all monailabel-env monailabel-test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

## make demo: install if needed, then build the demo data and run the whole bundle on it
demo: $(STAMP)
	$(BIN)/python scripts/demo.py --output demo

## make test: install if needed, then run the default (fast, offline, CPU) test suite
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

## make test-all: include the slow end-to-end tests
test-all: $(STAMP)
	$(BIN)/python -m pytest

## make monailabel-env: the MONAI Label environment (.venv-monailabel; its pins clash with the main one)
monailabel-env: $(ML_STAMP)

$(ML_STAMP): pyproject.toml scripts/monailabel_env.sh
	PYTHON=$(PYTHON) MONAILABEL_VENV=$(ML_VENV) bash scripts/monailabel_env.sh
	touch $(ML_STAMP)

## make monailabel-test: the MONAI Label app against a real MONAI Label server (both environments)
monailabel-test: $(STAMP) $(ML_STAMP)
	$(BIN)/python -m pytest -rs tests/test_monailabel.py

clean:
	rm -rf $(VENV) $(ML_VENV) dist demo .pytest_cache
