# imagegen: `make run` (the main job, locally, free) and `make test` (everything CI runs).
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$(PATH)
CARGO ?= cargo

.PHONY: run test services services-rabbitmq build lint fmt check unit it clean-data

## run: process examples/prompts.txt with the placeholder provider and ./data (no API key, no S3)
run: services-rabbitmq
	$(CARGO) build --bin imagegen
	APP_ENV=local ./target/debug/imagegen run examples/prompts.txt

## test: install and start RabbitMQ and Garage if needed, then run every check and test
test: services lint
	@command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --locked
	$(CARGO) nextest run --all-targets --no-fail-fast -E 'not test(/^serial::/)'
	@# Faults that hit every test running at the time (a broker restart) run on their own.
	$(CARGO) nextest run --test it --no-fail-fast -E 'test(/^serial::/)'

services:
	bash scripts/services.sh

services-rabbitmq:
	bash scripts/services.sh rabbitmq

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

build:
	$(CARGO) build --release --bin imagegen

clean-data:
	rm -rf data
