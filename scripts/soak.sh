#!/usr/bin/env bash
# The chaos soak (bench/app-sim/src/soak): lease readers and writers with
# write tokens run against a private PostgreSQL and Redis while a nemesis,
# drawn from --seed, kills the daemon, ends its walsender, restarts
# PostgreSQL, brings Redis back from an older snapshot, kills and pauses
# Redis clients, fills Redis, drops the slot, slows, cuts and strands the
# daemon's links (through forwarders in the harness) and (PostgreSQL 17+,
# see PGCI_TEST_PG_BINDIR) kills the primary and promotes its synchronous
# standby; after each round an independent checker compares every cached
# page with its rows' version counters.
# Arguments go to the soak: --minutes N (default 2), --seed S, --users,
# --readers. The last line is `violations=N kinds=K`; exit 1 on any
# violation. The release build of the daemon is used.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_test_deps
log "cargo build --release (the daemon and the soak)"
# Two builds: one invocation would unify the harness's redis features
# into the daemon.
cargo build --locked --release --bin pg-cache-invalidator -p pg-cache-invalidator
cargo build --locked --release -p pgci-app-sim --bin soak
log "soak $*"
PGCI_DAEMON_BIN="$PWD/target/release/pg-cache-invalidator" target/release/soak "$@"
