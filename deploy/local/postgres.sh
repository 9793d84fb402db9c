#!/usr/bin/env bash
# PostgreSQL 15 for tests and the demo: our own cluster in $STATE/pg (owned by the `postgres` OS
# user) on 127.0.0.1:55432, wal_level=logical, SCRAM auth, TLS with a local test CA.
#   postgres.sh [start]   install if missing, initdb if needed, start, wait until it answers
#   postgres.sh stop      fast shutdown (data kept)
#   postgres.sh status    exit 0 if it answers
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=55432
DATA="$STATE/pg"
PGBIN=/usr/lib/postgresql/15/bin
LOG="$STATE/pg.log"
TLS="$STATE/pg-tls"
SOCKET_DIR="${POLYSYNC_PG_SOCKET_DIR:-/tmp}"   # local (unix socket) connections: trust
export PGPASSWORD=postgres PGCONNECT_TIMEOUT=5
PSQL=("$PGBIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -X -v ON_ERROR_STOP=1 -Atq)

ready() {
  "$PGBIN/pg_isready" -q -h 127.0.0.1 -p $PORT -t 2 && "${PSQL[@]}" -c 'SELECT 1' >/dev/null 2>&1
}
# The postmaster of our data dir, if one is alive.
running_pid() {
  local pid
  [ -f "$DATA/postmaster.pid" ] || return 1
  pid=$(head -1 "$DATA/postmaster.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ] && echo "$pid"
}

case "${1:-start}" in
  stop)
    if [ -x "$PGBIN/pg_ctl" ] && running_pid >/dev/null; then
      runuser -u postgres -- "$PGBIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null 2>&1 \
        || fail postgres "$LOG" "pg_ctl stop failed"
      log "postgres stopped"
    else
      log "postgres not running"
    fi
    exit 0 ;;
  status) ready; exit ;;
  check)
    wal=$("${PSQL[@]}" -c 'SHOW wal_level') && [ "$wal" = logical ] || die "postgres check: wal_level is '${wal:-?}'"
    slots=$("${PSQL[@]}" -c 'SHOW max_replication_slots')
    # The polysync role over TLS (verify-full against the test CA), and a replication connection.
    PGPASSWORD=polysync "$PGBIN/psql" -X -Atq -v ON_ERROR_STOP=1 \
      "host=localhost port=$PORT user=polysync dbname=polysync sslmode=verify-full sslrootcert=$TLS/ca.crt" \
      -c 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()' | grep -qx t || die "postgres check: TLS login as polysync failed"
    PGPASSWORD=polysync "$PGBIN/psql" -X -Atq "host=127.0.0.1 port=$PORT user=polysync dbname=polysync replication=database" \
      -c 'IDENTIFY_SYSTEM' >/dev/null || die "postgres check: replication connection failed"
    log "postgres check ok: wal_level=logical, max_replication_slots=$slots, TLS and replication logins"
    exit 0 ;;
  start) ;;
  *) die "usage: postgres.sh [start|stop|status|check]" ;;
esac

t0=$(now_ms)
[ -x "$PGBIN/postgres" ] && [ -x "$PGBIN/psql" ] || apt_ensure postgresql-15 postgresql-client-15
command -v openssl >/dev/null || apt_ensure openssl
if ready; then log "postgres already running on 127.0.0.1:$PORT"; exit 0; fi

if [ ! -f "$DATA/PG_VERSION" ]; then
  log "postgres: initdb in $DATA"
  rm -rf "$DATA"; mkdir -p "$DATA"; chown postgres:postgres "$DATA"; chmod 700 "$DATA"
  pwfile=$(mktemp); echo postgres > "$pwfile"; chown postgres "$pwfile"
  runuser -u postgres -- "$PGBIN/initdb" -D "$DATA" -U postgres --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$STATE/pg-initdb.log" 2>&1 \
    || { rm -f "$pwfile"; rm -rf "$DATA"; fail postgres "$STATE/pg-initdb.log" "initdb failed"; }
  rm -f "$pwfile"
fi
runuser -u postgres -- test -w "$DATA" \
  || die "postgres: the postgres OS user cannot write $DATA (is a parent of $STATE private to root?)"

# A test CA and a server certificate for "localhost" (not 127.0.0.1, so tests can tell
# verify-full from verify-ca). Generated once per state dir, never committed.
if [ ! -f "$TLS/server.crt" ] || [ ! -f "$TLS/server.key" ] || [ ! -f "$TLS/ca.crt" ]; then
  mkdir -p "$TLS"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=polysync test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$TLS/ca.key" -out "$TLS/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$TLS/server.key" -out "$TLS/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > "$TLS/ext.cnf"
  openssl x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.crt" -CAkey "$TLS/ca.key" -CAcreateserial -days 3650 \
    -extfile "$TLS/ext.cnf" -out "$TLS/server.crt" 2>/dev/null
  chown postgres:postgres "$TLS/server.key" "$TLS/server.crt"; chmod 600 "$TLS/server.key"
fi

# Settings and pg_hba are re-applied on every start so edits to the shipped files take effect.
{ cat "$LOCAL_DIR/postgres/postgresql.local.conf"
  echo "port = $PORT"
  echo "unix_socket_directories = '$SOCKET_DIR'"
  echo "ssl = on"
  echo "ssl_cert_file = '$TLS/server.crt'"
  echo "ssl_key_file = '$TLS/server.key'"
} > "$DATA/postgresql.local.conf"
cp "$LOCAL_DIR/postgres/pg_hba.conf" "$DATA/pg_hba.conf"
grep -q "^include 'postgresql.local.conf'" "$DATA/postgresql.conf" || echo "include 'postgresql.local.conf'" >> "$DATA/postgresql.conf"
chown postgres:postgres "$DATA/postgresql.local.conf" "$DATA/pg_hba.conf"
touch "$LOG"; chown postgres "$LOG"
if [ "$SOCKET_DIR" != /tmp ]; then mkdir -p "$SOCKET_DIR" && chown postgres "$SOCKET_DIR"; fi

if pid=$(running_pid); then
  log "postgres: postmaster $pid is up but not answering yet, waiting"
else
  need_free_port postgres $PORT
  rm -f "$DATA/postmaster.pid"   # stale (no live postgres with that pid)
  echo "==== $(date -Is) postgres.sh start" >> "$LOG"
  # pg_ctl forks the postmaster in its own session; -w waits until it accepts connections.
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 90 start >/dev/null 2>&1 \
    || fail postgres "$LOG" "did not start (pg_ctl start failed)"
fi
wait_until 60 postgres ready || fail postgres "$LOG" "does not answer on 127.0.0.1:$PORT"

# Roles and databases the tests and the demo expect (idempotent).
"${PSQL[@]}" >/dev/null <<'SQL' || fail postgres "$LOG" "could not create role/database polysync"
SELECT 'CREATE ROLE polysync LOGIN REPLICATION PASSWORD ''polysync'''
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'polysync') \gexec
SELECT 'CREATE DATABASE polysync OWNER polysync'
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'polysync') \gexec
SQL
wal=$("${PSQL[@]}" -c 'SHOW wal_level') || fail postgres "$LOG" "SHOW wal_level failed"
[ "$wal" = logical ] || fail postgres "$LOG" "wal_level is '$wal', not logical"
log "postgres ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"
