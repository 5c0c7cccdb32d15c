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

.PHONY: install run repro test test-fast serve rollback schedule clean

# torch first and pinned exactly: torch==2.13.0 is the local CPU wheel, any other spec pulls CUDA.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python -m flows.kiln

repro: install
	dvc repro

test: install
	$(BIN)/python -m pytest -ra

test-fast: install
	$(BIN)/python -m pytest -ra -m "not slow"

# The champion of the task the last package run reported (pipeline/champion.py keeps the lines
# in $(BENTOML_HOME)/kiln/); in a fresh clone after `dvc pull`, the exported Bento is imported.
REPORT := reports/package.json
EXPORT := models/champion

# gRPC (Open Inference Protocol) listens on the Bento's serve.grpc_port unless GRPC_PORT (or
# KILN_GRPC_PORT in the environment) says otherwise.
serve: install
	bento=$$($(BIN)/python -m pipeline.champion bento --report $(REPORT) --export $(EXPORT)) && \
	$(if $(GRPC_PORT),KILN_GRPC_PORT=$(GRPC_PORT) )$(BIN)/bentoml serve $$bento --host 127.0.0.1 --port $(PORT)

# The previous champion (model and Bento) serves again at the next `make serve`.
rollback: install
	$(BIN)/python -m pipeline.champion rollback --report $(REPORT)

# A local Prefect server (own session, so Ctrl-C reaches only the serve process, which pauses
# the schedule first), then the deployment served on params.yaml's schedule.cron.
schedule: install
	@mkdir -p $(PREFECT_HOME)
	@setsid $(BIN)/prefect server start --host 127.0.0.1 --port 4200 --no-ui > $(PREFECT_HOME)/server.log 2>&1 & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server' EXIT INT TERM; \
	PREFECT_API_URL=http://127.0.0.1:4200/api $(BIN)/python -m flows.schedule

# Outputs and caches of this checkout; the BentoML store (champions) stays: see README.
clean:
	rm -rf data models reports/data_docs .dvc/tmp .dvc/cache .kiln
