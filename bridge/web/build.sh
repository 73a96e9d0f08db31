#!/usr/bin/env bash
# Builds the dispatcher page into bridge/web/dist/ (committed, embedded into the bridge binary by
# bridge/src/api/web.rs, so `cargo build` needs no node). Run it after changing anything in
# bridge/web/src, package.json or the build itself; `cargo test -p bridge` fails while dist/ is
# stale. Needs node >= 18 and npm; installs the pinned packages from package-lock.json.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d node_modules/esbuild ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --silent
fi
echo "building bridge/web/dist"
node build.mjs
