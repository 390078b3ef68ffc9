# mededge: one-command setup, demo, tests and benchmarks.
# `make install` is idempotent: it re-runs only when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch on this kind of machine; on a CUDA box set TORCH_SPEC to what you need.
TORCH_SPEC ?= torch==2.13.0
WORK ?= work
PYTEST_ARGS ?=

.PHONY: install demo test bench proto lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[all]'
	touch $@

proto: install
	$(PY) proto/generate.py

lint: install
	$(VENV)/bin/ruff check edge trainer converters tests
	$(VENV)/bin/lint-imports

# pytest exits 5 when it collects no tests; that is not a failure.
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

demo: install
	$(VENV)/bin/mededge synth --out $(WORK)/data --studies 24 --seed 7
	$(VENV)/bin/mededge train classify --data $(WORK)/data --repo $(WORK)/models --model nodule_cls
	$(VENV)/bin/mededge train segment --data $(WORK)/data --repo $(WORK)/models --model lung_seg
	$(VENV)/bin/mededge models --repo $(WORK)/models

bench: install
	$(VENV)/bin/mededge bench serve --work $(WORK)/bench

clean:
	rm -rf $(WORK) .pytest_cache
