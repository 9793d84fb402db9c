#!/usr/bin/env bash
# moto (AWS API emulator: DynamoDB, DynamoDB Streams, Timestream Write) on 127.0.0.1:55000,
# from PyPI into the virtualenv $STATE/venv (pip's cache in $CACHE/pip).
#   moto.sh [start] | stop | status | check
# State is in memory: a restart starts empty.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=55000
ENDPOINT="http://127.0.0.1:$PORT"
VENV="$STATE/venv"
PIDFILE="$STATE/moto.pid"
LOG="$STATE/moto.log"
REQ="$LOCAL_DIR/moto/requirements.txt"
# Any 200 from moto's own dashboard API means the server is up.
ready() { curl -fsS -m 5 -o /dev/null "$ENDPOINT/moto-api/data.json" 2>/dev/null; }
check() {
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 \
    "$VENV/bin/python" "$LOCAL_DIR/moto/check.py" "$ENDPOINT"
}

case "${1:-start}" in
  stop) stop_pidfile moto "$PIDFILE" 10; exit 0 ;;
  status) ready; exit ;;
  check) check >&2; exit ;;
  start) ;;
  *) die "usage: moto.sh [start|stop|status|check]" ;;
esac

t0=$(now_ms)
ensure_curl
if ready; then log "moto already running on 127.0.0.1:$PORT"; exit 0; fi

# The virtualenv, (re)installed when requirements.txt changes.
stamp="$VENV/.polysync-requirements-$(hash_files "$REQ")"
if [ ! -f "$stamp" ] || [ ! -x "$VENV/bin/moto_server" ]; then
  py=/usr/bin/python3
  if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
    if [ -x /usr/bin/python3 ] || ! command -v python3 >/dev/null; then apt_ensure python3 python3-venv
    else py=$(command -v python3); fi
  fi
  log "moto: creating $VENV and installing $(grep -v '^#' "$REQ" | xargs)"
  rm -rf "$VENV"
  "$py" -m venv "$VENV" || die "moto: python3 -m venv failed"
  export PIP_CACHE_DIR="$CACHE/pip" PIP_DISABLE_PIP_VERSION_CHECK=1
  "$VENV/bin/pip" install -q -r "$REQ" >"$STATE/moto-pip.log" 2>&1 \
    || fail moto "$STATE/moto-pip.log" "pip install failed"
  touch "$stamp"
fi

pid=$(spawn "$PIDFILE" "$LOG" "$VENV/bin/moto_server" -H 127.0.0.1 -p $PORT)
rc=0; wait_ready 60 "$pid" ready || rc=$?
[ $rc = 0 ] || fail moto "$LOG" "$( [ $rc = 2 ] && echo "moto_server exited" || echo "no answer on $ENDPOINT after 60s")"
log "moto ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"
