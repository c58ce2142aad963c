# polydet: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both create .venv and install what they need on first use (torch/torchvision from this
# machine's disk, the rest pinned by constraints.txt). --no-compile: pip would byte-compile
# every installed module (half the install's time on 2 cores); Python compiles the few it
# imports on first use instead (~12 s once).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Keep every tool's state inside the project and off the network (see README).
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export TORCH_HOME ?= $(CURDIR)/.torch
export GIT_PYTHON_REFRESH := quiet

.PHONY: install demo test lint bench ui clean dvc-yaml

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)

# The whole pipeline on the embedded default (synthetic data, CPU, SQLite MLflow in mlruns/,
# ephemeral Prefect); ends by printing where to look.
demo: $(STAMP)
	$(BIN)/python -m flows.pipeline

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# dvc.yaml is generated from the stage table (polydet/stages/table.py); commit the result.
dvc-yaml: $(STAMP)
	$(BIN)/polydet dvc-yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The MLflow UI on the demo's store (runs, metrics, artifacts, registered models and aliases).
ui: $(STAMP)
	mkdir -p mlruns
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

clean:
	rm -rf outputs .prefect .torch .pytest_cache
