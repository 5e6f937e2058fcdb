#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, and the
# integration tests, which start their own PostgreSQL and Redis.
# Installs PostgreSQL and Redis from Debian's packages if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_deps
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo test (unit and integration tests)"
cargo test --locked --lib --bins --tests "$@"
