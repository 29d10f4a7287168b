#!/usr/bin/env bash
# Throwaway PostgreSQL server for the store tests (controller/tests/store.rs).
#
#   .ci/pg.sh [start] [DIR] [PORT]   make sure PostgreSQL is installed, create a cluster in DIR
#                                    (default .ci/state/pg), start it on 127.0.0.1:PORT (default
#                                    55432, or the next free port) and print its URL as the last
#                                    line of stdout.
#   .ci/pg.sh stop [DIR]             stop the cluster in DIR (the files stay; delete DIR to reset).
#
# Idempotent: a second `start` on a running cluster only prints the URL again. Typical use:
#
#   export WARDGATE_TEST_PG_URL="$(.ci/pg.sh | tail -n1)"
#   cargo test -p wardgate-controller --test store
#
# Runs as root (initdb and pg_ctl then run as user `postgres` through runuser) or as any other
# user, who then owns the cluster. The cluster trusts every local connection and runs with
# fsync off: it is for tests only, never for data anyone needs.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEFAULT_DIR="$REPO_ROOT/.ci/state/pg"
DEFAULT_PORT=55432
DB_NAME=wardgate_test

log() { printf 'pg.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

is_root() { [ "$(id -u)" = 0 ]; }

# Runs a command as the cluster owner, from a directory that user can read.
as_owner() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

# Newest installed server binaries, e.g. /usr/lib/postgresql/15/bin.
find_bindir() {
    local initdb
    initdb="$(ls -1 /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1 || true)"
    [ -n "$initdb" ] && dirname "$initdb"
}

ensure_installed() {
    BINDIR="$(find_bindir || true)"
    if [ -n "$BINDIR" ]; then
        return
    fi
    is_root || die "PostgreSQL server binaries not found under /usr/lib/postgresql; install them as root: apt-get install -y postgresql"
    log "installing PostgreSQL (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y postgresql >&2
    BINDIR="$(find_bindir || true)"
    [ -n "$BINDIR" ] || die "apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb appeared"
}

# Absolute path of $1 without requiring it to exist.
abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$(pwd)" "$1" ;;
    esac
}

# Port of the running cluster in $1, read from postmaster.pid (4th line).
running_port() {
    sed -n 4p "$1/postmaster.pid" 2>/dev/null || true
}

is_running() {
    [ -f "$1/postmaster.pid" ] && as_owner "$BINDIR/pg_ctl" -D "$1" status >/dev/null 2>&1
}

port_in_use() {
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q . && return 0
    # Fallback when ss is missing or filtered: try to connect.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

url_for() { printf 'postgres://postgres@127.0.0.1:%s/%s\n' "$1" "$DB_NAME"; }

ensure_database() {
    local port="$1" exists
    exists="$(as_owner "$BINDIR/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")"
    if [ "$exists" != 1 ]; then
        log "creating database $DB_NAME"
        as_owner "$BINDIR/createdb" -h 127.0.0.1 -p "$port" -U postgres "$DB_NAME"
    fi
}

cmd_start() {
    local dir port
    dir="$(abspath "${1:-$DEFAULT_DIR}")"
    port="${2:-$DEFAULT_PORT}"
    case "$port" in
        '' | *[!0-9]*) die "port must be a number, got '$port'" ;;
    esac
    ensure_installed

    if is_running "$dir"; then
        port="$(running_port "$dir")"
        log "cluster in $dir is already running on port $port"
        ensure_database "$port"
        url_for "$port"
        return
    fi

    mkdir -p "$dir"
    if is_root; then
        chown postgres:postgres "$dir"
        # Every parent must be searchable by postgres, or initdb fails with a confusing error.
        runuser -u postgres -- test -x "$dir" \
            || die "user postgres cannot reach $dir; pick a directory whose parents are world-searchable (e.g. under /tmp or the repo)"
    fi
    chmod 700 "$dir"

    if [ ! -f "$dir/PG_VERSION" ]; then
        if [ -n "$(ls -A "$dir")" ]; then
            die "$dir is not empty and holds no cluster; delete it or pick another directory"
        fi
        log "initdb in $dir"
        as_owner "$BINDIR/initdb" -D "$dir" -A trust -U postgres -E UTF8 --no-sync >&2
    fi

    local tries=0
    while port_in_use "$port"; do
        tries=$((tries + 1))
        [ "$tries" -lt 100 ] || die "no free port found from ${2:-$DEFAULT_PORT} upwards"
        log "port $port is busy, trying $((port + 1))"
        port=$((port + 1))
    done

    log "starting PostgreSQL on 127.0.0.1:$port (log: $dir/server.log)"
    as_owner "$BINDIR/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >&2 || die "PostgreSQL did not start; see $dir/server.log"
    ensure_database "$port"
    url_for "$port"
}

cmd_stop() {
    local dir
    dir="$(abspath "${1:-$DEFAULT_DIR}")"
    ensure_installed
    if is_running "$dir"; then
        as_owner "$BINDIR/pg_ctl" -D "$dir" -m fast -w stop >&2
        log "stopped the cluster in $dir (delete the directory to throw it away)"
    else
        log "no cluster is running in $dir"
    fi
}

case "${1:-}" in
    stop) shift; cmd_stop "$@" ;;
    start) shift; cmd_start "$@" ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) cmd_start "$@" ;;
esac
