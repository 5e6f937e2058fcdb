#!/usr/bin/env bash
# The main job on a throw-away local default: installs PostgreSQL and Redis
# from Debian's packages if missing, starts both on free ports in a temp
# dir, loads the demo schema, runs `setup` and the daemon, caches some keys,
# writes to the database, and shows the keys disappear and the events that
# announce it. Everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_deps
log "building pg-cache-invalidator"
cargo build --quiet --locked
BIN=$PWD/target/debug/pg-cache-invalidator

WORK=$(mktemp -d -t pgci-demo-XXXXXX)
chmod 755 "$WORK"
PGPORT=$(free_port)
RPORT=$(free_port)
DAEMON_PID="" SUB_PID=""
cleanup() {
  [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
  [ -n "$SUB_PID" ] && kill "$SUB_PID" 2>/dev/null
  stop_redis "$RPORT"
  stop_postgres "$WORK/pg"
  rm -rf "$WORK"
}
trap cleanup EXIT

log "starting PostgreSQL on 127.0.0.1:$PGPORT and Redis on 127.0.0.1:$RPORT in $WORK"
start_postgres "$WORK/pg" "$PGPORT"
start_redis "$WORK" "$RPORT"
psql_() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres "$@"; }
rcli() { redis-cli -p "$RPORT" "$@"; }

log "loading the demo schema (sql/demo/avolve_schema.sql) with 100 users"
psql_ -f sql/demo/avolve_schema.sql
psql_ -c "select public.seed_demo_data(100)" >/dev/null

# The URLs come from the environment, as in production; the file holds the rules.
export DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT/postgres?sslmode=disable"
export REDIS_URL="redis://127.0.0.1:$RPORT/0"
cp sql/demo/avolve_config.toml "$WORK/config.toml"
# One refresh rule on top of the demo's delete rules: a user's whole
# balance page, kept written (not just deleted) by the daemon.
cat >>"$WORK/config.toml" <<'TOML'

[[rules]]
table  = "public.user_tokens"
keys   = ["balances:user:{user_id}"]
action = "refresh"
ttl    = "5m"
query  = "select json_agg(json_build_object('token_id', token_id, 'balance', balance) order by token_id) from public.user_tokens where user_id = $1::uuid"
params = ["user_id"]
TOML

log "pg-cache-invalidator setup --print (the SQL a DBA could run instead)"
"$BIN" setup --print --config "$WORK/config.toml"
log "pg-cache-invalidator setup"
"$BIN" setup --config "$WORK/config.toml"

log "starting the daemon (log: $WORK/daemon.log)"
"$BIN" run --config "$WORK/config.toml" 2>"$WORK/daemon.log" &
DAEMON_PID=$!
rcli subscribe cache-invalidation >"$WORK/events.txt" 2>/dev/null &
SUB_PID=$!
for _ in $(seq 100); do
  active=$(psql_ -tAc "select active from pg_replication_slots where slot_name = 'pg_cache_invalidator'")
  [ "$active" = "t" ] && break
  kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/daemon.log"; die "the daemon exited"; }
  sleep 0.1
done
[ "$active" = "t" ] || { cat "$WORK/daemon.log"; die "the daemon did not start streaming"; }

read -r ALICE BOB < <(psql_ -tA -F ' ' -c "select (array_agg(id order by id))[1], (array_agg(id order by id))[2] from public.profiles")
GEN=$(psql_ -tAc "select id from public.tokens where symbol = 'GEN'")
KEYS=(
  "profile:user:$ALICE" "profile:user:$BOB"
  "balance:user:$ALICE" "balance:user:$ALICE:token:$GEN"
  "balance:user:$BOB" "balance:user:$BOB:token:$GEN"
  "journey:user:$BOB"
)
log "the app caches some rows (cache-aside SET ... EX ttl)"
for key in "${KEYS[@]}"; do rcli set "$key" '{"cached":true}' EX 3600 >/dev/null; done
show_keys() { for key in "${KEYS[@]}"; do printf '  %-90s %s\n' "$key" "$( [ "$(rcli exists "$key")" = 1 ] && echo cached || echo gone)"; done; }
show_keys

log "writes the app never told the cache about"
psql_ -c "update public.profiles set full_name = 'Alice Example' where id = '$ALICE'"
psql_ -c "select public.transfer_tokens('$ALICE', '$BOB', '$GEN', 1)" >/dev/null
psql_ -c "delete from public.user_journeys where user_id = '$BOB'"
echo "  update profiles (alice); transfer_tokens(alice -> bob, GEN, 1); delete bob's journeys"

for _ in $(seq 100); do
  left=0
  for key in "${KEYS[@]}"; do left=$((left + $(rcli exists "$key"))); done
  [ "$left" -eq 1 ] && break   # only bob's profile was not touched
  sleep 0.1
done
log "the cache after the daemon applied the changes"
show_keys

log "refreshed by the daemon: alice's balance page (balances:user:…), read straight from Redis"
echo "  $(rcli get "balances:user:$ALICE")"

log "events published on the cache-invalidation channel"
sleep 0.3
grep '^{' "$WORK/events.txt" | sed 's/^/  /'

log "pg-cache-invalidator status"
"$BIN" status --config "$WORK/config.toml"

log "stopping the daemon (SIGTERM: it confirms what it applied, then exits)"
kill "$DAEMON_PID"; wait "$DAEMON_PID" || true; DAEMON_PID=""
tail -n 3 "$WORK/daemon.log" | sed 's/^/  /'
log "demo finished; PostgreSQL, Redis and $WORK are removed on exit"
