# Kiln. `make run` and `make test` work on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin

# Nothing leaves the machine; tool homes stay inside the project (see shared/STACK.md).
export PATH                             := $(BIN):$(PATH)
export DVC_NO_ANALYTICS                 := 1
export BENTOML_DO_NOT_TRACK             := True
export BENTOML_HOME                     := $(CURDIR)/.bentoml
export PREFECT_HOME                     := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK                     := 1
export PREFECT_LOGGING_LEVEL            ?= INFO

PORT ?= 3000
PREFECT_PORT ?= 4200

.PHONY: install run repro test test-fast serve rollback schedule clean

# torch first and pinned exactly: torch==2.13.0 is the local CPU wheel, any other spec pulls CUDA.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The wheels a Bento's requirements.txt pins (tests/wheelhouse.py, from pip's cache), so the test
# that installs a Bento into a clean virtualenv needs no network.
WHEELHOUSE := .kiln/wheelhouse
$(WHEELHOUSE)/requirements.txt: $(VENV)/.installed bentofile.yaml
	$(BIN)/python -m tests.wheelhouse $(WHEELHOUSE)

install: $(VENV)/.installed $(WHEELHOUSE)/requirements.txt

run: install
	$(BIN)/python -m flows.kiln

repro: install
	dvc repro

# One pytest worker per CPU (pytest-xdist), each file on one worker: a file's tests build on its
# module fixtures. Most slow tests wait on subprocesses and servers, so two workers on 2 cores
# took 12-15 min where one took 21 (docs/benchmarks.md, Tests). --no-loadscope-reorder: files in
# collection order, the longest first (tests/conftest.py LONGEST_FIRST), not xdist's most tests
# first, which started a 4-test file of 3 minutes last.
PYTEST := $(BIN)/python -m pytest -ra -n auto --dist loadfile --no-loadscope-reorder --durations=15

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

# The champion the workspace names: the record the package stage writes (committed with
# dvc.lock) and its exported Bento (pipeline/lifecycle/champion.py), imported into $(BENTOML_HOME) after
# every file is checked against its manifest.
POINTER := reports/champion.json
EXPORT := models/champion

# gRPC (Open Inference Protocol) listens on the Bento's serve.grpc_port unless GRPC_PORT (or
# KILN_GRPC_PORT in the environment) says otherwise; a port in use is refused before serving.
serve: install
	$(if $(GRPC_PORT),export KILN_GRPC_PORT=$(GRPC_PORT) && )\
	bento=$$($(BIN)/python -m pipeline.lifecycle.champion bento --champion $(POINTER) --export $(EXPORT)) && \
	$(BIN)/python -m pipeline.serving.oip $$bento 127.0.0.1 && \
	$(BIN)/bentoml serve $$bento --host 127.0.0.1 --port $(PORT)

# The previous champion (model and Bento) serves again at the next `make serve`; dvc.lock records
# the package stage's changed outputs when that stage was up to date.
rollback: install
	$(BIN)/python -m pipeline.lifecycle.champion rollback --champion $(POINTER) --export $(EXPORT) --stage package

# A local Prefect server with its UI on http://127.0.0.1:$(PREFECT_PORT) (flows/server.py; own
# session, so Ctrl-C reaches only the serve process, which pauses the schedule first), then the
# deployment served on params.yaml's schedule.cron.
schedule: install
	@mkdir -p $(PREFECT_HOME)
	@setsid $(BIN)/python -m flows.server --port $(PREFECT_PORT) > $(PREFECT_HOME)/server.log 2>&1 & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server' EXIT INT TERM; \
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/python -m flows.schedule

# Outputs and caches of this checkout. The champion record (reports/champion.json) and the BentoML
# store stay: `make serve` then serves the store's copy of the champion (README, Champion).
clean:
	rm -rf data models reports/data_docs .dvc/tmp .dvc/cache .kiln
