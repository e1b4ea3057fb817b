# imagegen: `make run` (the main job, locally, free) and `make test` (everything CI runs).
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$(PATH)
CARGO ?= cargo
# The test runner and the dependency checker, installed at these versions when missing.
NEXTEST_VERSION := 0.9.114
DENY_VERSION := 0.20.2
CARGO_FUZZ_VERSION := 0.13.1
# The fuzz targets (fuzz/fuzz_targets/), each a reader of outside input in the core crate.
FUZZ_TARGETS := job openai_answer batch_answer gemini_answer bfl_answer stability_answer replicate_answer fal_answer selfhosted_answer entra_grant http_headers amqp_headers
# cargo fuzz builds with the sanitizer flags of a nightly compiler; the one toolchain here is
# stable, and RUSTC_BOOTSTRAP lets it take them (for the fuzz build only).
FUZZ := RUSTC_BOOTSTRAP=1 $(CARGO) fuzz

.PHONY: run test services services-rabbitmq build deploy-check deny lint fmt check unit it clean-data bench fuzz fuzz-smoke fuzz-tool

## run: process examples/prompts.txt with the placeholder provider and ./data (no API key, no S3)
run: services-rabbitmq
	$(CARGO) build --bin imagegen
	APP_ENV=local ./target/debug/imagegen run examples/prompts.txt

## test: install and start RabbitMQ and Garage if needed, then run every check and test
test: services lint deny deploy-check fuzz-smoke
	@command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --version $(NEXTEST_VERSION) --locked
	@# Benches are built and linted (clippy --all-targets) but not run here: `make bench`.
	$(CARGO) nextest run --workspace --lib --bins --tests --no-fail-fast -E 'not test(/^serial::/)'
	@# Faults that hit every test running at the time (a broker restart, a cluster that loses a
	@# node: scripts/cluster.sh) run on their own, one at a time.
	$(CARGO) nextest run --test it --no-fail-fast --test-threads 1 -E 'test(/^serial::/)'

services:
	bash scripts/services.sh

services-rabbitmq:
	bash scripts/services.sh rabbitmq

## deny: the rules of deny.toml that need no network (bans, licenses, sources); the advisory
##   check needs the RustSec database: `cargo deny check advisories` where it can be fetched
deny:
	@command -v cargo-deny >/dev/null || $(CARGO) install cargo-deny --version $(DENY_VERSION) --locked
	@# The crates of every platform (a build fetches only this one's), for the license check.
	$(CARGO) fetch --locked
	$(CARGO) deny --offline --log-level error check bans licenses sources

## fuzz: run each fuzz target for FUZZ_SECS seconds (default 300) from its committed seeds
##   (fuzz/seeds/) and the corpus grown so far (fuzz/corpus/, not committed). A crash stops the
##   run and leaves its input in fuzz/artifacts/<target>/: reproduce it with
##   `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>`. FUZZ_TARGETS= picks targets.
fuzz: fuzz-tool
	@for target in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$target && \
		$(FUZZ) run -O $$target fuzz/corpus/$$target fuzz/seeds/$$target -- \
			-max_total_time=$(or $(FUZZ_SECS),300) -max_len=65536 -print_final_stats=1 || exit 1; \
	done

## fuzz-smoke: what `make test` runs: every seed of every target, then a few seconds of fuzzing
fuzz-smoke:
	$(MAKE) fuzz FUZZ_SECS=$(or $(FUZZ_SECS),5)

fuzz-tool:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked
	@# cargo fuzz has no --locked: the fuzz workspace's lock file is checked here.
	$(CARGO) fetch --locked --manifest-path fuzz/Cargo.toml

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## build: the release binary (deploy/Dockerfile runs this same target)
build:
	$(CARGO) build --release --locked --bin imagegen

## deploy-check: validate deploy/ (manifests, compose, alerts, dashboard) against their schemas
deploy-check:
	bash scripts/validate-deploy.sh

## bench: start RabbitMQ and Garage, build the release binary, run the end-to-end benchmark
##   (BENCHMARKS.md). SCENARIO=a|b|c|d|jitter|burst|fleet|poll|variants|lane|all (default all); optional N=, CONCURRENCY=, LATENCY_MS=,
##   IMAGE_KB=, BENCH_ARGS= (other harness options, e.g. "--repeat 2 --wait-idle-secs 600").
##   Prints a table; writes .bench/latest.json and .bench/<time>-<scenario>.json.
bench: services
	$(CARGO) build --release --workspace --bin imagegen --bin imagegen-fakes
	@# cargo bench relinks target/release/imagegen with dev-dependency features: run a copy.
	mkdir -p .bench && cp target/release/imagegen target/release/imagegen-fakes .bench/
	$(CARGO) bench --bench pipeline -- --bin .bench/imagegen --scenario $(or $(SCENARIO),all) \
		$(if $(N),--n $(N)) $(if $(CONCURRENCY),--concurrency $(CONCURRENCY)) \
		$(if $(LATENCY_MS),--latency-ms $(LATENCY_MS)) $(if $(IMAGE_KB),--image-kb $(IMAGE_KB)) \
		$(BENCH_ARGS)

clean-data:
	rm -rf data
