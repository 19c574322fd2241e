# The one command surface: CI, pre-commit and the README call these targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.DEFAULT_GOAL := all
.PHONY: install demo test lint format typecheck docs dist all bench schema flower up down logs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The zero-setup path: with PIPELINE_DATABASE_URL / PIPELINE_BROKER_URL unset, private
# PostgreSQL and Redis servers run under .pipeline/ for the length of the demo.
demo: install
	$(VENV)/bin/pipeline demo

# Four test processes on two cores: most of the suite's time is spent waiting on workers,
# leases and servers, not computing (TEST_PROCESSES=0 runs it in this one process).
TEST_PROCESSES ?= 4
test: install
	$(PY) -m pytest -n $(TEST_PROCESSES) --dist loadgroup $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: install
	$(VENV)/bin/mypy

# The documentation site, from docs/ (mkdocs.yml), into site/. Any warning fails the build: a
# link to a page or an anchor that does not exist, a cited test or file that is gone.
# (NO_MKDOCS_2_WARNING: mkdocs-material prints a notice about its successor on every build.)
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The sdist, then the wheel built from it (so a file the sdist leaves out shows), into dist/,
# checked as PyPI renders them. No build isolation: the backend (hatchling) is in the dev
# extras, so nothing is downloaded.
dist: install
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .
	$(VENV)/bin/twine check --strict dist/*

all: lint typecheck docs dist test

bench: install
	$(PY) bench/run_all.py

# pipeline/store/sql/schema.sql, rewritten from the migration chain (after adding a migration).
schema: install
	$(PY) scripts/dump_schema.py

# Flower on the configured broker; set FLOWER_BASIC_AUTH=user:password first.
flower: install
	$(VENV)/bin/pipeline flower

# The docker-compose stack (needs a Docker engine).
up:
	docker compose up -d --build

down:
	docker compose down

logs:
	docker compose logs -f --tail=100

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis site dist
