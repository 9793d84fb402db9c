#!/usr/bin/env bash
# InfluxDB 1.x (Debian `influxdb`) on 127.0.0.1:58086 (HTTP, no auth; RPC on 127.0.0.1:58088),
# config influxdb/influxdb.conf, meta/data/wal in $STATE/influxdb (kept across restarts).
#   influxdb.sh [start] | stop | status
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=58086
URL="http://127.0.0.1:$PORT"
DATA="$STATE/influxdb"
PIDFILE="$STATE/influxdb.pid"
LOG="$STATE/influxdb.log"
ready() { [ "$(curl -sS -m 5 -o /dev/null -w '%{http_code}' "$URL/ping" 2>/dev/null)" = 204 ]; }

case "${1:-start}" in
  stop) stop_pidfile influxdb "$PIDFILE" 30; exit 0 ;;
  status) ready; exit ;;
  start) ;;
  *) die "usage: influxdb.sh [start|stop|status]" ;;
esac

t0=$(now_ms)
ensure_curl
command -v influxd >/dev/null || apt_ensure influxdb
if ready; then log "influxdb already running on 127.0.0.1:$PORT"; exit 0; fi
mkdir -p "$DATA/meta" "$DATA/data" "$DATA/wal"
pid=$(INFLUXDB_META_DIR="$DATA/meta" INFLUXDB_DATA_DIR="$DATA/data" INFLUXDB_DATA_WAL_DIR="$DATA/wal" \
  spawn "$PIDFILE" "$LOG" "$(command -v influxd)" run -config "$LOCAL_DIR/influxdb/influxdb.conf")
rc=0; wait_ready 60 "$pid" ready || rc=$?
[ $rc = 0 ] || fail influxdb "$LOG" "$( [ $rc = 2 ] && echo "influxd exited" || echo "no answer on $URL/ping after 60s")"
log "influxdb ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"
