#!/usr/bin/env bash
# InfluxDB 1.x (Debian `influxdb`, 1.6.7 on bookworm) on 127.0.0.1:58086: HTTP only, no auth,
# RPC (backup/restore) on 127.0.0.1:58088, no other listener, no usage reporting.
# Config influxdb/influxdb.conf; meta/data/wal in $STATE/influxdb (kept across restarts), passed
# through INFLUXDB_META_DIR, INFLUXDB_DATA_DIR and INFLUXDB_DATA_WAL_DIR. The packaged service is
# never used (lib.sh's apt_ensure keeps the package from starting it).
#   influxdb.sh [start] | stop | status | check [-v]
# check: influxdb/check.py (line-protocol escaping round trip, partial write on a field type
# conflict; -v prints the answers). 1.6 has no /api/v2/write (404; it came with 1.8).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=58086
RPC_PORT=58088
URL="http://127.0.0.1:$PORT"
DATA="$STATE/influxdb"
PIDFILE="$STATE/influxdb.pid"
LOG="$STATE/influxdb.log"
ready() { [ "$(curl -sS -m 5 -o /dev/null -w '%{http_code}' "$URL/ping" 2>/dev/null)" = 204 ]; }
python() { if [ -x /usr/bin/python3 ]; then /usr/bin/python3 "$@"; else python3 "$@"; fi; }

case "${1:-start}" in
  stop) stop_pidfile influxdb "$PIDFILE" 30 influxd; exit 0 ;;
  status) ready; exit ;;
  check)
    if [ "${2:-}" = -v ]; then python "$LOCAL_DIR/influxdb/check.py" -v "$URL"; exit; fi
    python "$LOCAL_DIR/influxdb/check.py" "$URL" 2>&1 | sed 's/^/peers: /' >&2; exit "${PIPESTATUS[0]}" ;;
  start) ;;
  *) die "usage: influxdb.sh [start|stop|status|check [-v]]" ;;
esac

t0=$(now_ms)
ensure_curl
if ! command -v influxd >/dev/null; then
  apt_ensure influxdb
  # The package enables its own service (port 8086, /var/lib/influxdb) for the next boot: not ours.
  if command -v systemctl >/dev/null; then
    if [ -d /run/systemd/system ]; then systemctl disable --now influxdb >/dev/null 2>&1 || true
    else systemctl disable influxdb >/dev/null 2>&1 || true; fi
  fi
fi
if ready; then log "influxdb already running on 127.0.0.1:$PORT"; exit 0; fi
# Our influxd still starting up (a parallel start): wait for it instead of starting another.
if pid_alive "$PIDFILE" influxd; then
  if wait_ready 30 "$(cat "$PIDFILE")" ready; then log "influxdb already running on 127.0.0.1:$PORT"; exit 0; fi
  stop_pidfile influxdb "$PIDFILE" 30 influxd
fi
need_free_port influxdb $PORT $RPC_PORT
mkdir -p "$DATA/meta" "$DATA/data" "$DATA/wal"
pid=$(INFLUXDB_META_DIR="$DATA/meta" INFLUXDB_DATA_DIR="$DATA/data" INFLUXDB_DATA_WAL_DIR="$DATA/wal" \
  spawn "$PIDFILE" "$LOG" "$(command -v influxd)" run -config "$LOCAL_DIR/influxdb/influxdb.conf")
rc=0; wait_ready 60 "$pid" ready || rc=$?
[ $rc = 0 ] || fail influxdb "$LOG" "$( [ $rc = 2 ] && echo "influxd exited" || echo "no answer on $URL/ping after 60s")"
log "influxdb ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"
