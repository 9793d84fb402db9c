#!/usr/bin/env bash
# PostgreSQL 15 for tests and the demo: our own cluster in $STATE/pg on 127.0.0.1:55432,
# wal_level=logical, SCRAM auth. `postgres.sh stop` stops it (data is kept).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=55432
DATA="$STATE/pg"
PGBIN=/usr/lib/postgresql/15/bin
LOG="$STATE/pg.log"

if [ "${1:-start}" = stop ]; then
  if [ -f "$DATA/postmaster.pid" ]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
    log "postgres stopped"
  fi
  exit 0
fi

export PGPASSWORD=postgres
ready() { "$PGBIN/psql" -h 127.0.0.1 -p $PORT -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1; }
if ready; then log "postgres already running on 127.0.0.1:$PORT"; exit 0; fi

[ -x "$PGBIN/postgres" ] || apt_ensure postgresql-15 postgresql-client-15
start=$SECONDS
if [ ! -f "$DATA/PG_VERSION" ]; then
  rm -rf "$DATA"; mkdir -p "$DATA"; chown postgres:postgres "$DATA"; chmod 700 "$DATA"
  pwfile=$(mktemp); echo postgres > "$pwfile"; chown postgres "$pwfile"
  runuser -u postgres -- "$PGBIN/initdb" -D "$DATA" -U postgres --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$STATE/pg-initdb.log" 2>&1 \
    || { rm -f "$pwfile"; cat "$STATE/pg-initdb.log" >&2; die "initdb failed"; }
  rm -f "$pwfile"
  cp "$LOCAL_DIR/postgres/pg_hba.conf" "$DATA/pg_hba.conf"
  chown postgres:postgres "$DATA/pg_hba.conf"
  fresh=1
fi
# A test CA and a server certificate for "localhost" (not 127.0.0.1, so tests can tell
# verify-full from verify-ca). Generated once per machine state, never committed.
TLS="$STATE/pg-tls"
if [ ! -f "$TLS/server.crt" ]; then
  command -v openssl >/dev/null || apt_ensure openssl
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
# Settings are re-applied on every start so edits to the shipped file take effect.
{ cat "$LOCAL_DIR/postgres/postgresql.local.conf"
  echo "ssl = on"
  echo "ssl_cert_file = '$TLS/server.crt'"
  echo "ssl_key_file = '$TLS/server.key'"
} > "$DATA/postgresql.local.conf"
grep -q "include 'postgresql.local.conf'" "$DATA/postgresql.conf" || echo "include 'postgresql.local.conf'" >> "$DATA/postgresql.conf"
chown postgres:postgres "$DATA/postgresql.local.conf"
touch "$LOG"; chown postgres "$LOG"
rm -f "$DATA/postmaster.pid"
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$DATA" -l "$LOG" -o "-p $PORT -k /tmp" -w -t 60 start >/dev/null \
  || { tail -30 "$LOG" >&2; die "postgres did not start"; }
wait_until 60 postgres ready || { tail -30 "$LOG" >&2; die "postgres does not answer"; }
if [ "${fresh:-0}" = 1 ]; then
  "$PGBIN/psql" -h 127.0.0.1 -p $PORT -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
    -c "CREATE ROLE polysync LOGIN REPLICATION PASSWORD 'polysync'" -c "CREATE DATABASE polysync OWNER polysync" >/dev/null
fi
[ "$("$PGBIN/psql" -h 127.0.0.1 -p $PORT -U postgres -d postgres -Atc 'SHOW wal_level')" = logical ] || die "wal_level is not logical"
log "postgres ready on 127.0.0.1:$PORT ($((SECONDS - start))s)"
