#!/usr/bin/env bash
# Redis 7 for tests and the demo on 127.0.0.1:56379, no persistence. `redis.sh stop` stops it.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=56379
PIDFILE="$STATE/redis.pid"
if [ "${1:-start}" = stop ]; then stop_pidfile redis "$PIDFILE"; exit 0; fi
command -v redis-server >/dev/null || apt_ensure redis-server redis-tools
command -v redis-cli >/dev/null || apt_ensure redis-tools
if redis-cli -p $PORT ping >/dev/null 2>&1; then log "redis already running on 127.0.0.1:$PORT"; exit 0; fi
start=$SECONDS
redis-server --bind 127.0.0.1 --port $PORT --save '' --appendonly no --daemonize yes \
  --pidfile "$PIDFILE" --logfile "$STATE/redis.log" --dir "$STATE" >/dev/null
wait_until 20 redis redis-cli -p $PORT ping || { tail -20 "$STATE/redis.log" >&2; die "redis did not start"; }
log "redis ready on 127.0.0.1:$PORT ($((SECONDS - start))s)"
