# Two commands on a fresh machine: `make test` (sets up .venv, runs the suite) and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench-ops bench-models clean

install: $(STAMP)

# torch first and pinned: on these machines torch==2.13.0 is a local CPU wheel; installing the
# package afterwards finds it satisfied and never pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

# The whole job on generated data (about 30 minutes on 2 CPU cores): needle videos, a trained
# teacher, the four papers' students, runs/demo/report.md. A rerun reuses finished steps.
demo: install
	$(PY) -m linvid.cli demo --out runs/demo

lint: install
	$(VENV)/bin/ruff check linvid tests

bench-ops: install
	$(PY) -m linvid.bench.ops

# About 15 minutes on 2 CPU cores; writes the README's table and plots.
bench-models: install
	$(PY) -m linvid.bench.models --out docs/bench-models

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
