# polysync — the two commands that matter: `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# One build directory outside the clone, shared by every checkout on this machine (CI reuses it).
export CARGO_TARGET_DIR ?= $(HOME)/.cache/polysync/target
PEERS := deploy/local/peers.sh

.PHONY: help peers stop-peers build test test-faults demo lint fmt bench fuzz

help:
	@echo "make demo   - start local servers, run the daemon on a small e-commerce workload, show what it did"
	@echo "make test   - start local servers and run the whole test suite"
	@echo "make peers  - start the local servers only (make stop-peers stops them)"
	@echo "make lint   - cargo fmt --check and clippy -D warnings"
	@echo "make test-faults - the fault-injection suite with full-length outages"
	@echo "make fuzz   - run every cargo-fuzz target for a bounded time (FUZZ_SECONDS, default 60)"
	@echo "make bench  - benchmark polysync against pg_recvlogical and Debezium; report in bench/results/"

peers:
	bash $(PEERS)

stop-peers:
	bash $(PEERS) --stop

build:
	cargo build --bins

# The servers' addresses and the emulator's credentials come from .local/peers.env.
test: peers
	set -a && . ./.local/peers.env && set +a && cargo test --tests

# The fault-injection suite at full length: 20 kill -9s (as in make test) and 30 s sink and
# database outages (make test uses 5 s). POLYSYNC_TEST_SEED reproduces a run.
test-faults: peers
	set -a && . ./.local/peers.env && set +a && POLYSYNC_FAULT_PAUSE=30 POLYSYNC_FAULT_KILLS=20 \
		cargo test --test integration faults:: -- --test-threads 2

demo: peers build
	bash deploy/local/demo.sh

# BENCH_ARGS: e.g. --quick, --runs 5, --changes 2000000, --no-debezium, --only outage,fanout.
# BENCH_PROFILE=dev measures the tests' build (no release build needed; ratios within one run
# hold, absolute figures are lower than release).
BENCH_PROFILE ?= release
bench: peers
	cargo build $(if $(filter release,$(BENCH_PROFILE)),--release) --bins
	BENCH_PROFILE=$(BENCH_PROFILE) bash bench/run.sh $(BENCH_ARGS)

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

# Not part of CI: each cargo-fuzz target for FUZZ_SECONDS (needs the nightly toolchain).
FUZZ_SECONDS ?= 60
fuzz:
	bash fuzz/run.sh $(FUZZ_SECONDS)
