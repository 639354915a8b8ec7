# Every target sets up .venv first (scripts/bootstrap.sh is fast once it is done).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap run test lint bench chaos

bootstrap:
	@scripts/bootstrap.sh

run: bootstrap
	$(PY) -m devstack run

test: bootstrap
	$(PY) -m pytest

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy client/dispatcher_client  # the client package, strict too (root config)

bench: bootstrap
	$(PY) -m bench

# The fault scenarios many times each on a loaded machine (tests/chaos.py); not part of `make test`.
chaos: bootstrap
	$(PY) tests/chaos.py
