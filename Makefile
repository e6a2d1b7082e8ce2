# Two set-up commands: `make demo` and `make test`. Each creates .venv when missing and
# (re)installs the project only when pyproject.toml changed (stamp files).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test lint bench assets clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip check
	touch $@

$(STAMP_TEST): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip check
	touch $@ $(STAMP_RUN)

demo: $(STAMP_RUN)
	$(VENV)/bin/cyclex demo

test: $(STAMP_TEST)
	$(PY) -m pytest -q

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check cyclex tests benchmarks scripts

bench: $(STAMP_TEST)
	$(PY) -m benchmarks

clean-venv:
	rm -rf $(VENV)
