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
# The `scale` tests (real model widths, minutes and ~12 GB of memory) run in `make test-scale`.
PYTEST := -m pytest -q -n 2 --dist loadfile -m "not scale"

.PHONY: install test test-latest test-scale lock demo lint bench-ops bench-models mutate clean

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

# Every preset converts a checkpoint with Qwen2.5-VL-7B's widths (2 layers, bf16, sharded)
# and decodes like one full forward in float32: about 7 minutes on 2 CPU cores, one process
# at a time (peak ~12 GB of memory), 7 GB of temporary disk.
test-scale: install
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -p no:xdist -s -m scale tests

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

# Mutation testing of the core modules ([tool.mutmut] in pyproject.toml) with mutmut: hours on
# 2 CPU cores (docs/mutation.md has the times), so not part of `make test`. Its state lives in
# mutants/: a rerun goes on where the last one stopped; remove mutants/ to start afresh.
#   make mutate MUTATE_PATHS="linvid/niah/scoring.py linvid/ops"   only these files / folders
#   make mutate MUTANTS="linvid.niah.scoring.x_depth_bin__mutmut_4 linvid.ops.wkv6.*"
#       (re)tests exactly these mutants (names or globs), decided or not: after a new test
# MUTATE_JOBS mutants run side by side; each test process uses one torch thread.
# It ends with the counts per file and every mutant of the selection that was not killed.
MUTATE_PATHS ?=
MUTANTS ?=
MUTATE_JOBS ?= 2
MUTMUT := $(VENV)/bin/mutmut

mutate: install
	@set -f; names='$(MUTANTS)'; \
	if [ -z "$$names" ] && [ -n "$(MUTATE_PATHS)" ]; then \
	  names=$$($(PY) -c "$$MUTATE_SELECT" $(MUTATE_PATHS)) || exit 1; \
	  if [ -z "$$names" ]; then echo "mutate: every mutant of $(MUTATE_PATHS) is decided"; fi; \
	fi; \
	if [ -n "$$names" ] || [ -z "$(MUTATE_PATHS)$(MUTANTS)" ]; then \
	  OMP_NUM_THREADS=1 $(MUTMUT) run --max-children $(MUTATE_JOBS) $$names || exit 1; \
	fi
	@$(MUTMUT) results --all true | $(PY) -c "$$MUTATE_SUMMARY" $(or $(MUTATE_PATHS),linvid)

# The names of the mutants of MUTATE_PATHS still to test (all of a file edited since it was
# mutated, or never mutated yet: mutmut regenerates those); nothing when all are decided.
# (Named mutants are retested even when decided, hence the list rather than a glob.)
define MUTATE_SELECT
import json, sys
from pathlib import Path
from mutmut.configuration import config
names = []
for argument in sys.argv[1:]:
    top = Path(argument)
    for source in [top] if top.suffix == '.py' else sorted(top.rglob('*.py')):
        if not config().should_mutate(source):
            continue
        copy, meta = Path('mutants') / source, Path('mutants') / f'{source}.meta'
        module = '.'.join(source.with_suffix('').parts)
        if not meta.exists() or source.stat().st_mtime > copy.stat().st_mtime:
            names.append(module + '.*')
        else:
            codes = json.loads(meta.read_text())['exit_code_by_key']
            names += [name for name, code in codes.items() if code is None]
print(' '.join(names))
endef
export MUTATE_SELECT

# `mutmut results --all true` lines ("    NAME: STATUS") of the selected paths -> counts per
# file and the names of the mutants not killed.
define MUTATE_SUMMARY
import collections, sys
prefixes = tuple('.'.join(a.removesuffix('.py').strip('/').split('/')) + '.' for a in sys.argv[1:])
counts, left = collections.defaultdict(collections.Counter), []
for line in sys.stdin:
    name, _, status = line.strip().rpartition(': ')
    if name.startswith(prefixes):
        parts = name.split('.')
        function = next(i for i, part in enumerate(parts) if part.startswith(('x_', 'x\u01c1')))
        counts['.'.join(parts[:function])][status] += 1
        if status not in ('killed', 'not checked'):
            left.append(f'  {status:12} {name}')
print('mutants per module (mutmut show NAME prints one):')
for module, count in sorted(counts.items()):
    print(f'  {module:32} ' + ', '.join(f'{n} {s}' for s, n in sorted(count.items())))
print('tested and not killed:' if left else 'tested and not killed: none')
print('\n'.join(sorted(left)))
endef
export MUTATE_SUMMARY

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache .hypothesis
