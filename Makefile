# tncompress — set-up, tests, demo, benchmarks.
# Uses the active virtual environment if there is one, else creates .venv here.
SHELL := /bin/bash
PYTHON ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tncompress-installed
export TNCOMPRESS_DATA ?= $(abspath $(CURDIR)/../shared/data)
# Busy-waiting OpenMP threads starve each other on small machines: tests and benchmarks let idle
# threads sleep (the benchmarks' latency and training parts choose their own policy). The demo leaves it
# to the CLI, which picks per command (PASSIVE to decompose, OpenMP's default to train and report).
QUIET_OMP := OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}

.PHONY: install test demo bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Pinned, known-good torch/torchvision pair (requirements/constraints.txt); users' ranges are wider.
$(STAMP): $(PY) pyproject.toml requirements/constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e '.[test,transformers]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(QUIET_OMP) $(PY) -m pytest -q

demo: install
	bash scripts/demo.sh

bench: install
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e '.[bench]'
	$(QUIET_OMP) $(PY) benchmarks/run.py $(ARGS)

LINT_STAMP := $(VENV)/.tncompress-lint-installed
$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e '.[test,transformers,lint]'
	touch $(LINT_STAMP)

# ruff (rules in pyproject.toml) on everything; mypy on the library at the strictness pyproject.toml states.
lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check tncompress tests benchmarks scripts
	$(VENV)/bin/mypy

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache demo-out
