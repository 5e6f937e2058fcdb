#!/usr/bin/env bash
# Runs the app simulation (bench/app-sim) on throw-away PostgreSQL and
# Redis: the same workload under eight cache policies (no cache; the plan's
# TTLs with app-side deletes; the daemon deleting; the daemon refreshing;
# the daemon with leases and write tokens, bypassing or waiting; the same
# with the Rust client's in-process L1, whose connection is cut and whose
# Redis is restarted mid-run; every write with synchronous invalidation),
# one summary line per policy, a
# Markdown table against the plan's targets, and a plot of hit rate and
# stale reads over time (docs/app-sim.png). Arguments go to the
# simulation: --seconds S per policy (default 30, about 4 minutes in all),
# --users, --zipf, --workers, --read-rate (reads/s offered, 0: as fast as
# the loops go), --faults (every policy gets the L1 policy's cut and
# restart), --beside P (every other loop reads as policy P in the same
# run, reported apart), --writes, --bypass, --seed, --policies, --plot.
# The report is also written to target/app-sim-report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_test_deps
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  log "installing fonts-dejavu-core (the plot's labels)"
  apt_install --no-install-recommends fonts-dejavu-core
fi
log "cargo build --release (the daemon and the simulation)"
# Two builds: one invocation would unify the simulation's dependencies'
# features (the harness's insecure-TLS redis feature) into the daemon.
cargo build --locked --release --bin pg-cache-invalidator -p pg-cache-invalidator
cargo build --locked --release -p pgci-app-sim
mkdir -p target
log "app-sim $*"
PGCI_DAEMON_BIN="$PWD/target/release/pg-cache-invalidator" \
  target/release/app-sim "$@" | tee target/app-sim-report.md
