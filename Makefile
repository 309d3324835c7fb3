# streamproc — `make help` lists the targets. Everything installs and starts what it needs, idempotently.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SP     := $(VENV)/bin/streamproc
APT_PACKAGES := redis-server prometheus prometheus-alertmanager docker-compose openssl chromium chromium-driver
STAMP  := $(VENV)/.installed

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: deps
deps: system-deps $(STAMP) kafka-jars compile ## install everything (apt packages, Python venv, Kafka jars, compiled core)

.PHONY: system-deps
system-deps: ## apt-get install redis-server, prometheus, docker-compose if missing
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	@# Debian's packages start their own services where an init system exists; ours run on other ports.
	@command -v java >/dev/null || { echo "java (17+) is required"; exit 1; }
	@command -v mvn >/dev/null || { echo "maven is required"; exit 1; }

# the editable install builds the compiled core in place too (setup.py); setuptools in the venv is for `compile`
$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

.PHONY: compile clean-compiled
compile: $(STAMP) ## build the compiled domain core in place: the package build's build_ext (rebuilds what changed)
	$(PY) setup.py -q build_ext --inplace
clean-compiled: ## remove the compiled core from the checkout: the pure-Python sources run
	$(PY) -m streamproc.compiled clean

.PHONY: kafka-jars
kafka-jars: ## fetch the Kafka broker jars from Maven Central into .cache/kafka-libs
	@ls .cache/kafka-libs/kafka_2.13-*.jar >/dev/null 2>&1 || \
	  mvn -q -B -f infra/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=$(CURDIR)/.cache/kafka-libs

.PHONY: infra-up infra-down infra-status
infra-up: deps ## start the local Kafka broker and Redis (reuses running ones)
	$(SP) infra up
infra-down: ## stop the Kafka broker and Redis that streamproc started
	$(SP) infra down
infra-status: ## show the local services
	$(SP) infra status

.PHONY: topics
topics: infra-up ## create the declared topics (fails on a mismatch)
	$(SP) topics apply

.PHONY: schemas
schemas: $(STAMP) ## regenerate streamproc/contracts/schemas/*.json from the pydantic models
	$(SP) topics schemas

.PHONY: worker
worker: topics ## run one worker in the foreground
	$(SP) worker

.PHONY: demo
demo: infra-up ## the main job: local Kafka + Redis, topics, a worker, simulated traffic, results
	$(SP) demo

.PHONY: test
test: infra-up ## all tests (unit, integration, faults) on the real broker and Redis, on the compiled core
	STREAMPROC_REQUIRE_COMPILED=1 $(PY) -m pytest -q --durations=25 -m "not cluster" tests

.PHONY: test-cluster
test-cluster: infra-up ## the scale-out tests: a local Redis Cluster and a 3-broker Kafka (started by the fixtures)
	STREAMPROC_REQUIRE_COMPILED=1 $(PY) -m pytest -q --durations=10 -m cluster tests

.PHONY: test-unit
test-unit: compile ## pure tests only (no services)
	STREAMPROC_REQUIRE_COMPILED=1 $(PY) -m pytest -q tests/unit

.PHONY: test-integration
test-integration: infra-up ## integration tests on the real broker and Redis
	$(PY) -m pytest -q tests/integration

.PHONY: test-faults
test-faults: infra-up ## the fault tests only (kill -9, Redis restart); also part of `make test`
	$(PY) -m pytest -q -m faults tests

.PHONY: lint
lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check streamproc tests bench
	$(VENV)/bin/mypy

.PHONY: bench
bench: infra-up ## run the benchmarks in bench/ (not tests); results in bench/README.md
	$(PY) bench/throughput.py
	$(PY) bench/throughput.py --intake-floor
	$(PY) bench/latency.py
	$(PY) bench/quality.py
	$(PY) bench/churn_quality.py

.PHONY: bench-peers
bench-peers: ## the peers of bench/peers/ (Quix Streams, Bytewax) in a virtualenv of their own: .venv-peers
	@test -x .venv-peers/bin/python || $(PYTHON) -m venv .venv-peers
	.venv-peers/bin/python -m pip install -q "quixstreams==3.28.1" "bytewax==0.21.1" orjson

.PHONY: soak
soak: infra-up ## 30 minutes at a steady rate: RSS, Redis memory, lag and latency must stay flat
	$(PY) bench/soak.py

.PHONY: clean
clean: infra-down ## stop services and remove local state (keeps the jar cache and venv)
	rm -rf .local
