# Weir's front door. `make run` runs the example job locally; `make test` runs every test
# against the real parts (installing and caching them on first use).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
CARGO ?= cargo
TESTENV_DIR ?= $(CURDIR)/target/testenv
BIN_DIR = $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/debug
export CARGO_TERM_COLOR ?= never
# The test targets of the end-to-end suite (weir-e2e's tests/, against the environment) and
# the integration tests that need none (the runtime's; s3, storage, snapshots and savepoints
# run in e2e, against Garage; savepoints runs here without its ignored tests).
E2E_TESTS = $(basename $(notdir $(wildcard tests/tests/*.rs)))
UNIT_TESTS = $(filter-out s3 storage snapshots kafka,$(basename $(notdir $(wildcard runtime/tests/*.rs runtime/sdk-example/tests/*.rs controller/tests/*.rs crds/tests/*.rs storage/tests/*.rs cli/tests/*.rs))))

.PHONY: help install-deps build run test unit e2e env-up env-down generate check-generated fmt lint bench images clean fuzz

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

# Every cargo command here builds the whole workspace (never `-p X`, `--exclude`, `cargo run`):
# cargo resolves features over the packages it is given, so another selection compiles the
# dependency tree again with other features. Its progress goes to the terminal.
build: install-deps
	@echo "building the workspace (the first time: about 20 minutes on 2 cores; RocksDB is the long part)"
	$(CARGO) build --workspace --bins

# The binary the build made (no second build through `cargo run`).
run: build
	$(BIN_DIR)/weir run manifests/examples/wordcount.yaml

generate: build
	$(BIN_DIR)/crdgen > crds/weir-crds.yaml
	cp crds/weir-crds.yaml charts/weir/crds/weir-crds.yaml
	@mkdir -p docs/reference
	$(BIN_DIR)/crdgen --markdown > docs/reference/crds.md
	$$(bash tests/env/install-python.sh)/bin/python charts/render.py > manifests/install.yaml

# Unit and property tests: every test target but the end-to-end ones (weir-e2e's tests/ and
# the runtime's tests against S3, which need the environment).
unit: build
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test --workspace $(foreach t,$(UNIT_TESTS),--test $(t))

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
	  $(CARGO) test --workspace --test s3 --test storage --test snapshots --test kafka -- --include-ignored && \
	  $(CARGO) test --workspace --test savepoints -- --ignored && \
	  $(CARGO) test --workspace $(foreach t,$(E2E_TESTS),--test $(t)) -- --test-threads 4 && \
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

# Fuzzing (fuzz/README.md; not part of `make test`): the seed corpora rewritten by the real
# encoders, then each target for FUZZ_SECONDS. Nightly and cargo-fuzz, in a target directory
# of its own (the first build compiles RocksDB again: 20+ minutes on 2 cores). New inputs go
# to fuzz/corpus/<target>, crashes to fuzz/artifacts/<target>; it fails if any target crashed.
FUZZ_SECONDS ?= 60
FUZZ_TARGET_DIR ?= $(HOME)/.cache/weir/fuzz-target
FUZZ_TARGETS = wire_batch wire_frames control_json control_reader checkpoint_metadata in_flight keyed_entries
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo +stable install cargo-fuzz --locked
	CARGO_TARGET_DIR=$(FUZZ_TARGET_DIR) nice -n 15 cargo +nightly fuzz build
	$(FUZZ_TARGET_DIR)/x86_64-unknown-linux-gnu/release/seeds fuzz/seeds
	@failed=; for t in $(FUZZ_TARGETS); do \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s"; mkdir -p fuzz/corpus/$$t; \
	  CARGO_TARGET_DIR=$(FUZZ_TARGET_DIR) nice -n 15 cargo +nightly fuzz run $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=1024 -max_len=65536 -timeout=10 || failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashed:$$failed (inputs in fuzz/artifacts/)"; exit 1; fi

# Container images, where an engine runs (docker or podman): IMAGE_PREFIX/weir-controller and
# IMAGE_PREFIX/weir, tagged with the workspace version (what the chart's values name).
IMAGE_PREFIX ?= ghcr.io/weir-dev
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ENGINE ?= $(shell for e in docker podman; do $$e info >/dev/null 2>&1 && { echo $$e; break; }; done)
images:
	@if [ -z "$(ENGINE)" ]; then echo "make images: no container engine answers (docker info, podman info): nothing built"; exit 0; fi; \
	  set -x; \
	  DOCKER_BUILDKIT=1 $(ENGINE) build -f Dockerfile.controller -t $(IMAGE_PREFIX)/weir-controller:$(IMAGE_TAG) . && \
	  DOCKER_BUILDKIT=1 $(ENGINE) build -f Dockerfile.runtime -t $(IMAGE_PREFIX)/weir:$(IMAGE_TAG) . && \
	  DOCKER_BUILDKIT=1 $(ENGINE) build -f runtime/sdk-example/Dockerfile -t $(IMAGE_PREFIX)/weir-detector:$(IMAGE_TAG) .

clean:
	bash tests/env/down.sh $(TESTENV_DIR)
	$(CARGO) clean

# Fails when a generated file is stale (the crds crate's tests check the CRD YAML and the
# reference too).
check-generated: build
	@$(BIN_DIR)/crdgen | diff -u crds/weir-crds.yaml - >/dev/null || { echo "crds/weir-crds.yaml is stale: run make generate"; exit 1; }
	@diff -q crds/weir-crds.yaml charts/weir/crds/weir-crds.yaml >/dev/null || { echo "charts/weir/crds is stale: run make generate"; exit 1; }
	@$(BIN_DIR)/crdgen --markdown | diff -u docs/reference/crds.md - >/dev/null || { echo "docs/reference/crds.md is stale: run make generate"; exit 1; }
	@$$(bash tests/env/install-python.sh)/bin/python charts/render.py | diff -u manifests/install.yaml - >/dev/null || { echo "manifests/install.yaml is stale (the chart rendered with default values differs): run make generate"; exit 1; }
