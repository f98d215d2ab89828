#!/usr/bin/env bash
# The sink servers tickvault forwards to, on loopback, on their default ports:
#   PostgreSQL 127.0.0.1:5432 (role and database `tickvault`, password `tickvault`),
#   NATS 127.0.0.1:4222 with JetStream (monitoring on 127.0.0.1:8222),
#   ClickHouse 127.0.0.1:8123 (HTTP; user `default`, no password, database `tickvault`).
# These are what config/local-sinks.toml expects.
#
#   scripts/services.sh up      install what is missing (Debian packages), start what is
#                               not running, wait until each answers. Idempotent: a server
#                               already running and reachable is reused as it is.
#   scripts/services.sh down    stop what `up` started (nothing else).
#   scripts/services.sh status  which servers answer.
#   scripts/services.sh reset   empty what config/local-sinks.toml writes to: drop and make
#                               again the database `tickvault` in ClickHouse and PostgreSQL,
#                               delete the JetStream stream MARKET (the sinks make their
#                               tables and the stream again). For a demo on a new log.
#
# State (pid files, NATS's JetStream store, logs) lives in $TICKVAULT_SERVICES_DIR
# (default /var/tmp/tickvault-services).
#
# TICKVAULT_SERVICES_RAM=1 scripts/services.sh up   puts the data of each server that
# `up` starts on a tmpfs of its own (in memory, gone at `down`), so that the servers do
# not share the tickvault log's disk: on a one-disk machine, their writes otherwise
# queue ahead of the log's fsyncs (benchmarks; BENCHMARKS.md). Needs root.
set -euo pipefail

STATE="${TICKVAULT_SERVICES_DIR:-/var/tmp/tickvault-services}"
CH_PID=/var/run/clickhouse-server/tickvault.pid
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

say() { echo "services: $*" >&2; }
as_user() { # user, command...: run as another user, from root or through sudo
    local user=$1
    shift
    if [ "$(id -u)" -eq 0 ]; then runuser -u "$user" -- "$@"; else sudo -u "$user" "$@"; fi
}

# Waits until a server answers, for as long as the process that `up` started for it is
# alive, at most LIMIT seconds, saying every 15 s that it is still waiting: ClickHouse 18.16
# loads every part of every table before it listens, which took 2 minutes here with 450
# parts on disk. A server that exits while starting is reported at once, with the end of
# its log.
wait_for() { # name, limit in seconds, pid ("" when `up` did not start it itself), log, command...
    local name=$1 limit=$2 pid=$3 log=$4 start=$SECONDS next=15
    shift 4
    while ! "$@" >/dev/null 2>&1; do
        if [ -n "$pid" ] && ! ps -o stat= -p "$pid" 2>/dev/null | grep -qv Z; then
            say "$name exited while starting; the end of $log:"
            tail -n 20 "$log" >&2 || true
            return 1
        fi
        if [ $((SECONDS - start)) -ge "$limit" ]; then
            say "$name did not answer within $limit s; its log is $log"
            return 1
        fi
        if [ $((SECONDS - start)) -ge "$next" ]; then
            say "$name: still starting after $next s"
            next=$((next + 15))
        fi
        sleep 0.25
    done
}

install_missing() {
    local need=()
    for pkg in postgresql nats-server clickhouse-server clickhouse-client curl; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        say "installing: ${need[*]}"
        $sudo apt-get update -q >/dev/null
        # No policy-rc.d games: on machines without systemd the packages' own start
        # attempts fail harmlessly and we start the servers below.
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
    fi
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
# Each check gives up after 5 s, so a server that accepts and never answers counts as not
# up (and wait_for's limit still holds) instead of hanging `up`.
nats_up() { curl -fs --max-time 5 -o /dev/null http://127.0.0.1:8222/healthz?js-enabled-only=true; }
ch_up() { curl -fs --max-time 5 -o /dev/null http://127.0.0.1:8123/ping; }
ch_running() { pgrep -f -- "--pid-file=$CH_PID" >/dev/null; } # the server `up` started

# With TICKVAULT_SERVICES_RAM=1: mounts a tmpfs on DIR, holding what DIR held, owned as
# DIR was; remembered so that `down` unmounts it once its server has stopped.
ram_dir() { # dir
    local dir=$1 copy owner mode
    [ "${TICKVAULT_SERVICES_RAM:-0}" = 1 ] || return 0
    mountpoint -q "$dir" && return 0
    copy=$(mktemp -d)
    owner=$(stat -c %U:%G "$dir")
    mode=$(stat -c %a "$dir")
    $sudo cp -a "$dir/." "$copy/"
    $sudo mount -t tmpfs -o size=12g,mode=0700 tmpfs "$dir"
    $sudo cp -a "$copy/." "$dir/"
    $sudo chown "$owner" "$dir"
    $sudo chmod "$mode" "$dir"
    $sudo rm -rf "$copy"
    echo "$dir" >>"$STATE/ram.mounts"
    say "data in memory: $dir"
}

ram_release() {
    [ -f "$STATE/ram.mounts" ] || return 0
    while read -r dir; do
        $sudo umount "$dir" 2>/dev/null && say "unmounted $dir" || true
    done <"$STATE/ram.mounts"
    rm -f "$STATE/ram.mounts"
}

start_postgres() {
    if pg_up; then
        say "postgresql: reusing the server on 127.0.0.1:5432"
    else
        local version
        version=$(ls /usr/lib/postgresql | sort -n | tail -1)
        if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main"; then
            $sudo pg_createcluster "$version" main >/dev/null
        fi
        ram_dir "/var/lib/postgresql/$version/main"
        $sudo pg_ctlcluster "$version" main start
        touch "$STATE/postgresql.started"
        echo "$version" >"$STATE/postgresql.version"
        wait_for postgresql 120 "" "/var/log/postgresql/postgresql-$version-main.log" pg_up
        say "postgresql $version: started on 127.0.0.1:5432"
    fi
    # The role and database config/local-sinks.toml names; tests create their own databases.
    as_user postgres psql -q -v ON_ERROR_STOP=1 <<'SQL' >/dev/null
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tickvault') THEN
    CREATE ROLE tickvault LOGIN CREATEDB PASSWORD 'tickvault';
  END IF;
END $$;
SQL
    pg_database
}

# The database config/local-sinks.toml names, made if missing (by `up` and `reset`).
pg_database() {
    if ! as_user postgres psql -tAc "SELECT 1 FROM pg_database WHERE datname = 'tickvault'" | grep -q 1; then
        as_user postgres createdb -O tickvault tickvault
    fi
}
ch_sql() { # statement: run on the ClickHouse `up` reaches, giving up after 60 s
    curl -fsS --max-time 60 http://127.0.0.1:8123/ --data-binary "$1" >/dev/null
}
ch_database() { ch_sql 'CREATE DATABASE IF NOT EXISTS tickvault'; }

start_nats() {
    if nats_up; then
        say "nats: reusing the JetStream server on 127.0.0.1:4222"
        return
    fi
    if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
        say "nats: something listens on 4222 without JetStream monitoring on 8222; stop it or enable JetStream"
        return 1
    fi
    mkdir -p "$STATE/nats"
    ram_dir "$STATE/nats"
    setsid nohup nats-server -a 127.0.0.1 -p 4222 -m 8222 -js -sd "$STATE/nats" \
        -P "$STATE/nats.pid" >"$STATE/nats.log" 2>&1 </dev/null &
    wait_for nats 120 $! "$STATE/nats.log" nats_up
    touch "$STATE/nats.started"
    say "nats: started with JetStream on 127.0.0.1:4222 (monitoring 8222)"
}

start_clickhouse() {
    if ch_up; then
        say "clickhouse: reusing the server on 127.0.0.1:8123"
    else
        # The package's own config: listens on localhost, data in /var/lib/clickhouse,
        # owned by the clickhouse user the package created.
        $sudo mkdir -p /var/run/clickhouse-server /var/log/clickhouse-server
        $sudo chown clickhouse:clickhouse /var/run/clickhouse-server /var/log/clickhouse-server /var/lib/clickhouse 2>/dev/null || true
        ram_dir /var/lib/clickhouse
        as_user clickhouse setsid nohup clickhouse-server --config-file=/etc/clickhouse-server/config.xml \
            --pid-file="$CH_PID" >"$STATE/clickhouse.log" 2>&1 </dev/null &
        wait_for clickhouse 900 $! /var/log/clickhouse-server/clickhouse-server.err.log ch_up
        touch "$STATE/clickhouse.started"
        say "clickhouse $(curl -fsS --max-time 10 'http://127.0.0.1:8123/?query=SELECT%20version()'): started on 127.0.0.1:8123"
    fi
    ch_database
}

up() {
    install_missing
    mkdir -p "$STATE"
    # The demo's PostgreSQL password file: git keeps no mode but the executable bit, and
    # the daemon warns about a secret file others can read.
    chmod 600 "$(dirname "$0")/../config/local-sinks.postgres-password"
    start_postgres
    start_nats
    start_clickhouse
}

down() {
    if [ -f "$STATE/clickhouse.started" ]; then
        # Run in the foreground, the server writes no pid file: find it by the command line
        # `up` gave it.
        $sudo pkill -f -- "--pid-file=$CH_PID" 2>/dev/null || true
        # It finishes what it is writing first: give it up to 2 minutes.
        for _ in $(seq 480); do ch_running || break; sleep 0.25; done
        if ch_running; then
            say "clickhouse: still stopping after 2 minutes; run \`down\` again later"
        else
            rm -f "$STATE/clickhouse.started"
            say "clickhouse: stopped"
        fi
    fi
    if [ -f "$STATE/nats.started" ]; then
        if [ -f "$STATE/nats.pid" ]; then
            local pid
            pid=$(cat "$STATE/nats.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        fi
        rm -f "$STATE/nats.started"
        say "nats: stopped"
    fi
    if [ -f "$STATE/postgresql.started" ]; then
        $sudo pg_ctlcluster "$(cat "$STATE/postgresql.version")" main stop || true
        rm -f "$STATE/postgresql.started"
        say "postgresql: stopped"
    fi
    ram_release
}

# Deletes a JetStream stream over NATS's own protocol (no `nats` CLI in Debian 12): a
# request on $JS.API.STREAM.DELETE.<name>, its answer read from an inbox. A stream that
# does not exist is fine.
nats_delete_stream() { # name
    local line answer=""
    exec 3<>/dev/tcp/127.0.0.1/4222
    printf 'CONNECT {"verbose":false}\r\nSUB _INBOX.tickvault.reset 1\r\nPUB $JS.API.STREAM.DELETE.%s _INBOX.tickvault.reset 0\r\n\r\n' "$1" >&3
    while IFS= read -r -t 10 line <&3; do
        case "$line" in
        MSG*)
            IFS= read -r -t 10 answer <&3
            break
            ;;
        -ERR*)
            answer=$line
            break
            ;;
        esac
    done
    exec 3>&-
    case "$answer" in
    *'"success":true'*) say "nats: stream $1 deleted" ;;
    *'"err_code":10059'*) say "nats: no stream $1" ;;
    *)
        say "nats: deleting stream $1 failed: ${answer:-no answer}"
        return 1
        ;;
    esac
}

reset() {
    if ! status 2>/dev/null; then
        say "reset: every server must be up first (scripts/services.sh up)"
        return 1
    fi
    ch_sql 'DROP DATABASE IF EXISTS tickvault'
    ch_database
    say "clickhouse: database tickvault emptied"
    as_user postgres dropdb --if-exists --force tickvault
    pg_database
    say "postgresql: database tickvault emptied"
    nats_delete_stream MARKET
}

status() {
    local rc=0
    for s in postgresql:pg_up nats:nats_up clickhouse:ch_up; do
        if ${s#*:} >/dev/null 2>&1; then say "${s%%:*}: up"; else say "${s%%:*}: down"; rc=1; fi
    done
    return $rc
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
reset) reset ;;
*)
    echo "usage: $0 up|down|status|reset" >&2
    exit 2
    ;;
esac
