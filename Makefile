# Two commands on a fresh machine: `make test` (sets up .venv, runs the suite) and `make demo`.
# `make test` installs the locked set (requirements/lock.txt, exact versions the suite passed
# on), with the dev and eval (lmms-eval) extras; `make test-latest` runs the same suite on the
# newest versions pyproject's ranges admit (in .venv-latest). `.ci/run` runs both. `make lock`
# re-resolves the lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
LATEST_VENV := .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
# The lock holds the floor of the transformers range (the newest is tested by test-latest), so
# both ends of the range, and both of its cache-argument conventions, are tested.
LOCK_FLOOR := transformers==5.23.0
PYTEST := -m pytest -q -n 2 --dist loadfile

.PHONY: install test test-latest lock demo lint bench-ops bench-models clean

install: $(STAMP)

# Exact versions from the lock, torch included: torch 2.14.1 + torchvision 0.29.1 (see
# README, "Tested versions"); no dependency can pull another torch build.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev,eval]'
	$(PY) -m pip check
	touch $(STAMP)

test: install
	$(PY) $(PYTEST)

# The newest versions the ranges allow, resolved anew on every run (--upgrade, eager), so a
# new release that breaks linvid turns CI red. The versions used are printed first.
test-latest:
	test -x $(LATEST_PY) || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install --quiet --upgrade pip
	$(LATEST_PY) -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev,eval]'
	$(LATEST_PY) -m pip check
	$(LATEST_PY) -m pip freeze --exclude-editable | grep -iE '^(torch|torchvision|transformers|tokenizers|accelerate|peft|safetensors|numpy|av|pillow|qwen-vl-utils|lmms.eval|filelock)==' | tr '\n' ' '; echo
	$(LATEST_PY) $(PYTEST)

# Re-resolve the lock in a scratch venv: the transformers floor, the newest of the rest.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet '$(LOCK_FLOOR)' -e '.[dev,eval]'
	(echo '# make lock: the exact set `make test` installs (pip constraints). Regenerate with make lock.'; \
	 .venv-lock/bin/python -m pip freeze --exclude-editable) > $(LOCK)
	rm -rf .venv-lock

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
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache .hypothesis
