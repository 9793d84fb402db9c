#!/usr/bin/env bash
# Redis 7 for tests and the demo on 127.0.0.1:56379, no persistence (redis/redis.conf).
#   redis.sh [start] | stop | status
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=56379
PIDFILE="$STATE/redis.pid"
LOG="$STATE/redis.log"
ready() { redis-cli -h 127.0.0.1 -p $PORT ping 2>/dev/null | grep -qx PONG; }

case "${1:-start}" in
  stop) stop_pidfile redis "$PIDFILE" 30 redis-server; exit 0 ;;
  status) ready; exit ;;
  check)
    k="polysync:peers-check:$$"; R=(redis-cli -h 127.0.0.1 -p "$PORT")
    ready && [ "$("${R[@]}" set "$k" ok EX 30)" = OK ] && [ "$("${R[@]}" get "$k")" = ok ] && "${R[@]}" del "$k" >/dev/null \
      || die "redis check: PING/SET/GET failed"
    log "redis check ok: $("${R[@]}" info server | grep -o 'redis_version:[0-9.]*')"
    exit 0 ;;
  start) ;;
  *) die "usage: redis.sh [start|stop|status|check]" ;;
esac

t0=$(now_ms)
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_ensure redis-server redis-tools
if ready; then log "redis already running on 127.0.0.1:$PORT"; exit 0; fi
need_free_port redis $PORT
echo "==== $(date -Is) redis.sh start" >> "$LOG"
# daemonize yes: redis-server forks and writes the pidfile itself.
redis-server "$LOCAL_DIR/redis/redis.conf" --port $PORT --pidfile "$PIDFILE" --logfile "$LOG" --dir "$STATE" \
  >>"$LOG" 2>&1 </dev/null || fail redis "$LOG" "redis-server failed to start"
wait_until 20 redis ready || fail redis "$LOG" "does not answer PING on 127.0.0.1:$PORT"
log "redis ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"
