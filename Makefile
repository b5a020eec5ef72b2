# marketcast: `make run` for the demo, `make test` for the suite. CI (.ci/run)
# calls `make test` plus fmt and clippy.
SHELL := /bin/bash
CARGO ?= cargo
export PGDEV_DIR ?= /tmp/marketcast-pg-dev


.PHONY: all build run test test-deps lint browser-test metrics-check ts-test unit fuzz bench bench-deps bench-sql bench-quick soak fmt clippy pg-start pg-stop clean

all: build

build:
	$(CARGO) build --release

# The demo: a throwaway Postgres (unless DATABASE_URL is set), writer,
# broadcaster, synthetic trades and the market page. Ctrl-C stops it all.
run: build
	./target/release/marketcast demo

# The whole suite against a real Postgres. Without DATABASE_URL a throwaway
# cluster is started with bin/pg-dev (in its own directory) and stopped after.
test: test-deps
	@set -euo pipefail; \
	if [ -z "$${DATABASE_URL:-}" ]; then \
	  export PGDEV_DIR=/tmp/marketcast-pg-test-$$$$; \
	  eval "export $$(bin/pg-dev start | tail -n1)"; \
	  trap 'bin/pg-dev stop --wipe >/dev/null 2>&1 || true' EXIT; \
	fi; \
	ulimit -n "$$(ulimit -Hn)" 2>/dev/null || true; \
	$(CARGO) test --all-targets -- --test-threads=$${TEST_THREADS:-8}; \
	$(MAKE) --no-print-directory browser-test; \
	$(MAKE) --no-print-directory metrics-check; \
	$(MAKE) --no-print-directory ts-test

# Servers the integration suite runs for real beside Postgres (HAProxy for
# tests/it/balancer.rs, PgBouncer for tests/it/pooler.rs), installed from
# Debian's packages when missing.
TEST_PACKAGES ?= haproxy pgbouncer
test-deps:
	@set -euo pipefail; \
	missing=""; \
	for p in $(TEST_PACKAGES); do command -v $$p >/dev/null 2>&1 || [ -x /usr/sbin/$$p ] || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make test needs:$$missing (sudo apt-get install$$missing)" >&2; exit 1; fi; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

# The market page in headless Chromium (/usr/bin/chromium, Debian's package)
# driven by playwright-core; see tests/browser/page.test.mjs; and a real
# EventSource across a SIGKILLed broadcaster (tests/browser/sse.test.mjs). Uses DATABASE_URL
# (a fresh database is created in its cluster) or a throwaway cluster.
browser-test: test-deps
	@set -euo pipefail; \
	missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "browser-test needs:$$missing (sudo apt-get install$$missing)" >&2; exit 1; fi; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi; \
	$(CARGO) build; \
	if [ ! -d tests/browser/node_modules ]; then npm ci --prefix tests/browser --no-audit --no-fund; fi; \
	if [ -z "$${DATABASE_URL:-}" ]; then \
	  export PGDEV_DIR=/tmp/marketcast-pg-browser-$$$$; \
	  eval "export $$(bin/pg-dev start | tail -n1)"; \
	  trap 'bin/pg-dev stop --wipe >/dev/null 2>&1 || true' EXIT; \
	fi; \
	node tests/browser/page.test.mjs; \
	node tests/browser/sse.test.mjs

# cargo-fuzz targets of every parser of untrusted input (fuzz/, its own
# workspace; docs/TESTING.md). Stable Rust is enough: `--sanitizer none` needs
# no -Z flag, and `--debug-assertions` makes integer overflow a crash. One
# target after another, FUZZ_SECONDS each; never part of `make test`.
FUZZ_TARGETS ?= client_op query_subscribe writer_request doorbell signed ws_frames token
FUZZ_SECONDS ?= 600
fuzz:
	@set -euo pipefail; \
	command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked; \
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS)s"; \
	  $(CARGO) fuzz run --sanitizer none --debug-assertions $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
	    -dict=fuzz/json.dict -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1; \
	done

# Plain-SQL inserts/s with and without the trigger's NOTIFY (pgbench).
bench-sql:
	bench/sql-inserts.sh

unit:
	$(CARGO) test --lib

# What CI checks besides the tests: formatting and clippy with warnings
# denied (the crate and bench/), and the developer docs (private items
# included) with warnings denied.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path bench/Cargo.toml -- --check
	$(MAKE) --no-print-directory clippy
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --document-private-items --lib

# Benchmarks (issue 5: S1..S6 and the table workload, each beside a raw
# baseline) against their own throwaway Postgres in /tmp/marketcast-bench-pg;
# the servers under test run as child processes (target/release/marketcast).
# The bench is its own package and workspace in bench/ (like fuzz/), built into
# this target directory so that target/release/marketcast-bench finds
# target/release/marketcast beside it.
# `bench` runs every marketcast scenario 3 times, T and S2 also 3 times on
# each peer (the Node bridge of bench/bridge and the raw baseline, rounds
# alternating), S1 and S3 the peers once, and writes the medians to
# docs/BENCHMARKS.md and docs/bench/*.png (BENCH_ARGS="--runs 1" for one
# pass, "--scenarios s3" for one scenario, "--no-bridge" without Node).
# The peers' rounds take T's 3 runs to about 4 minutes (9 rounds of ~28 s)
# and, by estimate on a quiet machine, S2's to about 7 (about 12 steps of
# 4 s for marketcast and the raw baseline, 6 for the bridge, plus 5,000
# connects per round): about 8 minutes more than before issue 14.
# `bench-quick` is a small smoke run (5.5 minutes after the build, measured
# with other work on the machine) whose report goes to target/bench-quick.md.
# `soak` (issue 6): 10,000 connections with trades flowing for 10 minutes;
# server RSS, descriptors and threads at start and end, into
# docs/bench/soak.md (SOAK_ARGS="--soak-duration 60" for a short one).
# 15,000 connections need that many open files in each process: the soft
# limit is raised to the hard one first.
BENCH_ARGS ?=
SOAK_ARGS ?=
BENCH_BUILD = $(CARGO) build --release --manifest-path bench/Cargo.toml --target-dir target
bench: build bench-deps
	$(BENCH_BUILD)
	ulimit -n "$$(ulimit -Hn)" 2>/dev/null || true; ./target/release/marketcast-bench $(BENCH_ARGS)

bench-quick: build bench-deps
	$(BENCH_BUILD)
	ulimit -n "$$(ulimit -Hn)" 2>/dev/null || true; ./target/release/marketcast-bench --quick $(BENCH_ARGS)

# The Node peer of S1, T, S2 and S3 (issue 14, bench/bridge: ws + pg, pinned
# by its package-lock.json): Debian's nodejs and npm when missing, then its
# node_modules (npm ci) when absent. Skipped when BENCH_ARGS leaves the bridge
# out (--no-bridge, --no-baseline, --targets without it).
bench-deps:
	@set -euo pipefail; \
	args=" $(BENCH_ARGS) "; \
	case "$$args" in *" --no-bridge "*|*" --no-baseline "*) exit 0;; esac; \
	case "$$args" in *" --targets"*) case "$$args" in *bridge*) ;; *) exit 0;; esac;; esac; \
	missing=""; \
	command -v node >/dev/null 2>&1 || missing="$$missing nodejs"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make bench needs:$$missing (sudo apt-get install$$missing), or BENCH_ARGS=--no-bridge" >&2; exit 1; fi; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi; \
	if [ ! -d bench/bridge/node_modules ]; then npm ci --prefix bench/bridge --no-audit --no-fund; fi

soak: build
	$(BENCH_BUILD)
	ulimit -n "$$(ulimit -Hn)" 2>/dev/null || true; ./target/release/marketcast-bench --scenarios soak $(SOAK_ARGS)

# The bench (bench/, its own workspace) too; fuzz/ is left to `make fuzz`.
fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt --manifest-path bench/Cargo.toml

clippy:
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --manifest-path bench/Cargo.toml --target-dir target --all-targets -- -D warnings

pg-start:
	@bin/pg-dev start

pg-stop:
	@bin/pg-dev stop

clean:
	$(CARGO) clean

# bin/check-metrics: docs/alerts.yaml through `promtool check rules` and its
# unit tests (docs/alerts.test.yaml), and the /metrics of a real writer and
# broadcaster (the debug binary) through `promtool check metrics`. promtool is
# Debian's `prometheus` package, installed when missing. Uses DATABASE_URL (a
# fresh database is created in its cluster) or a throwaway cluster.
metrics-check:
	@set -euo pipefail; \
	missing=""; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v curl >/dev/null 2>&1 || missing="$$missing curl"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "metrics-check needs:$$missing (sudo apt-get install$$missing)" >&2; exit 1; fi; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi; \
	$(CARGO) build; \
	bin/check-metrics target/debug/marketcast

# The TypeScript client (clients/typescript, marketcast-client): npm ci (the
# pinned tsc, esbuild and undici, the WebSocket of Node < 20; in its
# node_modules only), typecheck, a rebuild into
# a scratch directory that must equal the committed dist/ (which the demo page
# embeds, so the Rust build needs no Node), its tests with node --test against
# real servers (target/debug/marketcast), and the bundle size (min+gzip).
# Uses DATABASE_URL (a fresh database per test) or a throwaway cluster.
TS_DIR := clients/typescript
ts-test:
	@set -euo pipefail; start=$$(date +%s); \
	$(CARGO) build; \
	npm ci --prefix $(TS_DIR) --no-audit --no-fund --loglevel=error; \
	(cd $(TS_DIR) && ./node_modules/.bin/tsc -p tsconfig.json --noEmit); \
	(cd $(TS_DIR) && node scripts/check-types.mjs); \
	fresh=$$(mktemp -d); trap 'rm -rf "$$fresh"' EXIT; \
	(cd $(TS_DIR) && ./node_modules/.bin/tsc -p tsconfig.json --outDir "$$fresh"); \
	if ! diff -r "$$fresh" $(TS_DIR)/dist; then \
	  echo "ts-test: $(TS_DIR)/dist is stale: run 'npm run build --prefix $(TS_DIR)' and commit dist/" >&2; exit 1; \
	fi; \
	if [ -z "$${DATABASE_URL:-}" ]; then \
	  export PGDEV_DIR=/tmp/marketcast-ts-$$$$; \
	  eval "export $$(bin/pg-dev start | tail -n1)"; \
	  trap 'rm -rf "$$fresh"; bin/pg-dev stop --wipe >/dev/null 2>&1 || true' EXIT; \
	fi; \
	ws=""; if node --experimental-websocket -e '' 2>/dev/null; then ws=--experimental-websocket; fi; \
	node $$ws --test $(TS_DIR)/test/*.test.mjs; \
	(cd $(TS_DIR) && node scripts/size.mjs); \
	echo "ts-test: passed in $$(( $$(date +%s) - start )) s"
