# meshcloud: `make demo` and `make test` are the two commands; both bootstrap first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: bootstrap demo demo-down test test-fast lint typecheck bench bench-quick appliance rack-image field-guide clean

bootstrap:
	@scripts/bootstrap.sh

appliance: bootstrap
	@$(PY) -m meshcloud.images.appliance build

# The rack OS image (as root; cached in build/rack-os by a hash of its inputs).
rack-image: bootstrap
	@$(VENV)/bin/meshcloud image build

demo: bootstrap appliance
	@$(VENV)/bin/meshcloud demo up

demo-down: bootstrap
	@$(VENV)/bin/meshcloud demo down

lint: bootstrap
	$(VENV)/bin/ruff check meshcloud tests bench
	$(VENV)/bin/ruff format --check meshcloud tests bench
	cd ansible && ansible-lint -q

typecheck: bootstrap
	$(VENV)/bin/mypy

# Everything, slow suites included: what CI runs.
test: lint typecheck appliance
	$(VENV)/bin/pytest --durations=30 $(PYTEST_ARGS)

# The fast suites only, for a quick check while developing.
test-fast: bootstrap
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

bench: bootstrap appliance
	@for b in bench/[!_]*.py; do [ "$$b" = bench/plot.py ] && continue; echo "== $$b"; $(PY) $$b || exit 1; done

bench-quick: bootstrap appliance
	@for b in bench/[!_]*.py; do [ "$$b" = bench/plot.py ] && continue; echo "== $$b"; $(PY) $$b --quick || exit 1; done

# The printable field guide and quick card, en and fr, in field-guide/build/ (weasyprint).
field-guide: bootstrap
	@$(PY) -m meshcloud.fieldguide build

clean:
	rm -rf build rack-images/appliances/build .mypy_cache .pytest_cache .ruff_cache
