# Weir's front door. `make run` runs the example job locally; `make test` runs every test
# against the real parts (installing and caching them on first use).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
CARGO ?= cargo
TESTENV_DIR ?= $(CURDIR)/target/testenv
BIN_DIR = $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/debug
export CARGO_TERM_COLOR ?= never

.PHONY: help install-deps build run test unit e2e env-up env-down generate check-generated fmt lint bench images clean

help:
	@echo "make run        run the example job locally (no Kubernetes, no S3)"
	@echo "make test       every test, with the real parts (installs what it needs)"
	@echo "make unit       unit and property tests only"
	@echo "make e2e        end-to-end tests against the test environment (starts and stops it)"
	@echo "make env-up     start the test environment; writes target/testenv/env.sh"
	@echo "make env-down   stop it"
	@echo "make generate   regenerate the CRD YAML (crds/, charts/weir/crds/) and the CRD reference (docs/reference/crds.md)"
	@echo "make lint       rustfmt and clippy"
	@echo "make bench      benchmarks, with the peer's figures from the same run"
	@echo "make images     container images of the controller and the runtime (docker or podman)"

install-deps:
	@bash tests/env/install-build-deps.sh

build: install-deps
	$(CARGO) build --workspace --bins

run: build
	$(CARGO) run -q -p weir-runtime --bin weir -- run manifests/examples/wordcount.yaml

generate:
	$(CARGO) run -q -p weir-crds --bin crdgen > crds/weir-crds.yaml
	cp crds/weir-crds.yaml charts/weir/crds/weir-crds.yaml
	@mkdir -p docs/reference
	$(CARGO) run -q -p weir-crds --bin crdgen -- --markdown > docs/reference/crds.md
	$$(bash tests/env/install-python.sh)/bin/python charts/render.py > manifests/install.yaml

unit: install-deps
	$(CARGO) test --workspace --lib --bins --tests --exclude weir-e2e
	$(CARGO) test -p weir-e2e --lib --bins

env-up: build
	bash tests/env/up.sh $(TESTENV_DIR)

env-down:
	bash tests/env/down.sh $(TESTENV_DIR)

# The end-to-end tests share one environment per run, each test in its own namespace.
e2e: build
	@bash tests/env/down.sh $(TESTENV_DIR)
	@bash tests/env/up.sh $(TESTENV_DIR)
	@trap 'bash tests/env/down.sh $(TESTENV_DIR)' EXIT; \
	  source $(TESTENV_DIR)/env.sh; \
	  $(CARGO) test -p weir-runtime --test s3 --test storage --test snapshots -- --include-ignored && \
	  $(CARGO) test -p weir-runtime --test savepoints -- --ignored && \
	  $(CARGO) test -p weir-e2e --test '*' -- --test-threads 4 && \
	  $$WEIR_PYTHON -m pytest -q tests/python

test: unit e2e

fmt:
	$(CARGO) fmt --all

lint: install-deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench:
	bash bench/keyed_count.sh
	bash bench/checkpoints.sh
	bash bench/savepoints.sh
	bash bench/controller.sh
	bash bench/upgrades.sh

# Container images, where an engine runs (docker or podman): IMAGE_PREFIX/weir-controller and
# IMAGE_PREFIX/weir, tagged with the workspace version (what the chart's values name).
IMAGE_PREFIX ?= ghcr.io/weir-dev
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ENGINE ?= $(shell for e in docker podman; do $$e info >/dev/null 2>&1 && { echo $$e; break; }; done)
images:
	@if [ -z "$(ENGINE)" ]; then echo "make images: no container engine answers (docker info, podman info): nothing built"; exit 0; fi; \
	  set -x; \
	  DOCKER_BUILDKIT=1 $(ENGINE) build -f Dockerfile.controller -t $(IMAGE_PREFIX)/weir-controller:$(IMAGE_TAG) . && \
	  DOCKER_BUILDKIT=1 $(ENGINE) build -f Dockerfile.runtime -t $(IMAGE_PREFIX)/weir:$(IMAGE_TAG) .

clean:
	bash tests/env/down.sh $(TESTENV_DIR)
	$(CARGO) clean

# Fails when a generated file is stale (the crds crate's tests check the CRD YAML and the
# reference too).
check-generated:
	@$(CARGO) run -q -p weir-crds --bin crdgen | diff -u crds/weir-crds.yaml - >/dev/null || { echo "crds/weir-crds.yaml is stale: run make generate"; exit 1; }
	@diff -q crds/weir-crds.yaml charts/weir/crds/weir-crds.yaml >/dev/null || { echo "charts/weir/crds is stale: run make generate"; exit 1; }
	@$(CARGO) run -q -p weir-crds --bin crdgen -- --markdown | diff -u docs/reference/crds.md - >/dev/null || { echo "docs/reference/crds.md is stale: run make generate"; exit 1; }
	@$$(bash tests/env/install-python.sh)/bin/python charts/render.py | diff -u manifests/install.yaml - >/dev/null || { echo "manifests/install.yaml is stale (the chart rendered with default values differs): run make generate"; exit 1; }
