# Every target sets up .venv first (scripts/bootstrap.sh is fast once it is done).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap run test test-fast lint bench chaos

bootstrap:
	@scripts/bootstrap.sh

run: bootstrap
	$(PY) -m devstack run

test: bootstrap
	$(PY) -m pytest

# The fast tier: unit tests and the Redis scripts on a bare redis-server; no torch, no TorchServe.
test-fast: bootstrap
	$(PY) -m pytest tests/unit

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy client/dispatcher_client  # the client package, strict too (root config)

bench: bootstrap
	$(PY) -m bench

# The fault scenarios many times each on a loaded machine (tests/support/chaos.py); not part of `make test`.
chaos: bootstrap
	$(PY) tests/support/chaos.py
