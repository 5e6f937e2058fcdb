#!/usr/bin/env bash
# Builds the TypeScript client into an npm tarball an app installs with one
# command:
#   scripts/pack-client.sh        -> target/npm/pg-cache-invalidator-client-<version>.tgz
#   npm install /path/to/that.tgz ioredis   (in the app)
# Installs Node.js and npm from Debian's packages when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

command -v npm >/dev/null || install_missing nodejs npm
out=$PWD/target/npm
mkdir -p "$out"
cd clients/typescript
log "npm ci (the client's build tools)"
npm ci --no-audit --no-fund --loglevel=error >&2
log "npm pack (builds dist/: CommonJS, ESM and their types)"
tarball=$(npm pack --silent --pack-destination "$out" | tail -n 1)
echo "$out/$tarball"
