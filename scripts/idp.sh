#!/usr/bin/env bash
# Prepares the test OpenID provider (tools/test-idp, oidc-provider on Node) that the identity
# tests start: installs Node and npm from Debian when `node` is missing (as root), then runs
# `npm ci` when node_modules is missing or older than the lockfile. Idempotent and quiet when
# there is nothing to do, so scripts/test calls it on every run.
#
#   scripts/idp.sh
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IDP_DIR="$REPO_ROOT/tools/test-idp"
MIN_NODE_MAJOR=20

log() { printf 'idp.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "node and npm are missing: install Node.js >= $MIN_NODE_MAJOR with npm (as root this script does it: apt-get install nodejs npm)"
    log "installing nodejs npm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q nodejs npm
fi

major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt "$MIN_NODE_MAJOR" ]; then
    die "node $(node --version) is too old for oidc-provider 9: install Node.js >= $MIN_NODE_MAJOR (e.g. from NodeSource)"
fi

stamp="$IDP_DIR/node_modules/.package-lock.json"
if [ ! -f "$stamp" ] || [ "$IDP_DIR/package-lock.json" -nt "$stamp" ]; then
    log "npm ci in $IDP_DIR"
    (cd "$IDP_DIR" && npm ci --no-audit --no-fund --loglevel=error)
fi
