# The contract: `make up` runs the whole stack on this machine, `make down`
# stops it, `make test` runs every test. All need root on Debian 12.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: setup build up down status test lint unit e2e bench packages

setup:
	deploy/setup.sh

build: setup
	cargo build --release --bins

# The Debian packages (docs/install.md) into target/debian/.
packages: build
	cargo deb -p agent --no-build
	cargo deb -p collector --no-build
	cargo deb -p ztctl --no-build

up: build
	deploy/local-stack.sh up

down:
	deploy/local-stack.sh down

status:
	deploy/local-stack.sh status

lint: setup
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

# One build profile (dev) for every test; end-to-end tests run the binaries
# built here as real processes.
test: setup lint
	cargo build --bins
	cargo test --no-fail-fast

# Benchmarks are not part of `make test`; the end-to-end bench runs the
# release binaries. Results and how to read them: docs/benchmarks.md.
bench: setup
	cargo build --release --bins
	cargo bench
