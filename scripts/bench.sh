#!/usr/bin/env bash
# Runs the benchmark (bench/main.rs) on a private PostgreSQL and Redis:
# drain vs pg_recvlogical for 1000-row and 1-row transactions, live latency
# at fixed write rates, memory while draining a large backlog, and a naive
# one-DEL-per-row consumer as the baseline. Arguments go to the benchmark,
# e.g. scripts/bench.sh --changes 100000 --runs 1. The report is also
# written to target/bench-report.md. Takes about 10 minutes with defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_test_deps
log "cargo bench --bench pipeline -- $*"
cargo bench --locked --bench pipeline -- "$@" | tee target/bench-report.md
