# Quick start: `make run` sets everything up and runs the whole pipeline on the tiny profile; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
export DAGSTER_HOME := $(CURDIR)/.dagster_home
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup run test test-fast repro ui mlflow-ui bench demo demo-setup demo-web

# The project's environment. DVC lives in its own environment (.dvc-tool): its hydra-core pins an antlr4 runtime
# that breaks Dagster's asset-selection parser, so the `dvc` command is linked into .venv/bin instead of installed there.
$(VENV)/.installed: pyproject.toml tools/dvc-requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	test -x .dvc-tool/bin/python || $(PYTHON) -m venv .dvc-tool
	.dvc-tool/bin/pip install --quiet -r tools/dvc-requirements.txt
	ln -sf ../../.dvc-tool/bin/dvc $(VENV)/bin/dvc
	$(VENV)/bin/pip check
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/music pipeline

# The method shown working: the procedural experiment's full method (and the rows that need no other model) on the
# `procedural` profile, on a CPU: metrics/procedural.json, metrics/procedural_examples.png, MLflow runs.
# `make demo ROWS=all`: every row of the table, the ablations' MUSIC models included (one training each).
ROWS ?=
demo: setup
	$(VENV)/bin/music demo procedural $(foreach row,$(ROWS),--row $(row))

# The web demo's extra (gradio) on top of the project's environment, checked with pip check like setup.
$(VENV)/.demo-installed: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e '.[test,demo]'
	$(VENV)/bin/pip check
	touch $@

demo-setup: $(VENV)/.demo-installed

# `music demo web`: the Gradio page on http://127.0.0.1:$(PORT) over models/lora (make run trains it).
PORT ?= 7860
demo-web: demo-setup
	$(VENV)/bin/music demo web --port $(PORT)

# Two pytest-xdist workers, as each test holds one torch thread on a 2-core machine. Work stealing: the `long` tests
# come first in the collection (tests/conftest.py), so the first worker starts on them, one after another, while the
# second takes the short ones, and a worker that runs out takes half of the other's queue. --durations: the slowest
# tests, to keep the suite's time in view.
test: setup
	$(VENV)/bin/pytest -n 2 --dist worksteal --durations=25

test-fast: setup
	$(VENV)/bin/pytest -m "not slow and not e2e"

# DVC's stages call `music` and the project's python: put the environment first on PATH.
repro: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

ui: setup
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1 --port 5000 --workers 1

bench: setup
	for b in zoo location data train generate metrics parallel; do $(VENV)/bin/music bench $$b; done
