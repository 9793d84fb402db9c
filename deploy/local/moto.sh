#!/usr/bin/env bash
# moto, the AWS API emulator, on 127.0.0.1:55000 for DynamoDB, DynamoDB Streams and Timestream
# Write (clients: endpoint_url http://127.0.0.1:55000, region us-east-1, keys test/test).
#   moto.sh [start] | stop | status | check [-v]
#
# Installed from PyPI with the pins in moto/requirements.txt (moto[server] and boto3) into the
# virtualenv $STATE/venv. The wheels are downloaded once into $CACHE/wheels/moto-<hash> so that a
# fresh clone on the same machine installs offline in seconds; pip's own cache is $CACHE/pip.
# pip is skipped when the venv already has the pinned versions.
#
# moto keeps everything in memory: a restart (or `curl -X POST .../moto-api/reset`) starts empty,
# so tests create their own tables. What moto does differently from AWS (moto 5.2.5; `check -v`
# shows it):
#  - DynamoDB Streams: one shard per stream, always "shardId-00000001541626099285-f35f62ef", never
#    split or closed (no ParentShardId/EndingSequenceNumber); SequenceNumbers are 22-digit decimal
#    strings counting up by 1 from 1100000000017454423009 for every table, also for a table
#    re-created under the same name. ApproximateCreationDateTime is epoch seconds with ms
#    fractions. Iterators never expire; an unknown iterator is an HTTP 500, not
#    ExpiredIteratorException. A stream ARN is resolved by table name only.
#  - Timestream Write: records are stored as sent and never validated: a lower Version, a
#    conflicting value with the same Version, an unknown MeasureValueType or an old timestamp are
#    all accepted (AWS: RejectedRecordsException); CommonAttributes are dropped. DescribeEndpoints
#    answers the real ingest.timestream.<region>.amazonaws.com, so an SDK with endpoint discovery
#    must not use it when an endpoint URL is configured. timestream-query cannot read the data back
#    (Query returns no rows unless results are preset through /moto-api/static/timestream/...).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=55000
ENDPOINT="http://127.0.0.1:$PORT"
VENV="$STATE/venv"
PIDFILE="$STATE/moto.pid"
LOG="$STATE/moto.log"
PIPLOG="$STATE/moto-pip.log"
REQ="$LOCAL_DIR/moto/requirements.txt"
REQ_HASH=$(hash_files "$REQ")
STAMP="$VENV/.polysync-moto-$REQ_HASH"
# A tiny JSON answer from moto's own API: the server is up and it is moto.
ready() { curl -fsS -m 5 -o /dev/null "$ENDPOINT/moto-api/config" 2>/dev/null; }
check() {
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 \
    "$VENV/bin/python" "$LOCAL_DIR/moto/check.py" "$@" "$ENDPOINT"
}

case "${1:-start}" in
  stop) stop_pidfile moto "$PIDFILE" 10 moto_server; exit 0 ;;
  status) ready; exit ;;
  check)
    if [ "${2:-}" = -v ]; then check -v; exit; fi
    check 2>&1 | sed 's/^/peers: /' >&2; exit "${PIPESTATUS[0]}" ;;
  start) ;;
  *) die "usage: moto.sh [start|stop|status|check [-v]]" ;;
esac

# venv_ok: the venv runs and has exactly the pinned versions, with moto[server]'s web stack.
venv_ok() {
  [ -f "$STAMP" ] && [ -x "$VENV/bin/moto_server" ] || return 1
  "$VENV/bin/python" - "$REQ" >/dev/null 2>&1 <<'PY'
import re, sys
from importlib.metadata import version
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        name, want = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", line).groups()
        if version(name) != want:
            sys.exit(1)
version("flask"), version("flask-cors")
PY
}

ensure_venv() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then return 0; fi
  rm -rf "$VENV"   # missing, or broken (its base python went away)
  local py=/usr/bin/python3
  [ -x "$py" ] || py=$(command -v python3 || echo /usr/bin/python3)
  if ! "$py" -m venv "$VENV" >>"$PIPLOG" 2>&1; then
    apt_ensure python3 python3-venv   # Debian's python3 needs python3-venv for ensurepip
    rm -rf "$VENV"
    /usr/bin/python3 -m venv "$VENV" >>"$PIPLOG" 2>&1 || fail moto "$PIPLOG" "python3 -m venv $VENV failed"
  fi
}

# fill_wheels DIR: download the pinned packages and their dependencies (one network pass).
fill_wheels() {
  local dir=$1
  [ -f "$dir/.complete" ] && return 0   # another clone filled it while we waited for the lock
  local tmp="$dir.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  log "moto: downloading $(grep -v '^#' "$REQ" | xargs) and dependencies (pip)"
  if ! "$VENV/bin/pip" download -q -d "$tmp" -r "$REQ" >>"$PIPLOG" 2>&1; then
    rm -rf "$tmp"; fail moto "$PIPLOG" "pip download failed"
  fi
  touch "$tmp/.complete"
  rm -rf "$dir" && mv "$tmp" "$dir"
  # Wheelhouses of older pins are of no use any more.
  find "$CACHE/wheels" -maxdepth 1 -name 'moto-*' ! -name "$(basename "$dir")" -exec rm -rf {} + 2>/dev/null || true
}

install() {
  local t; t=$(now_ms)
  echo "==== $(date -Is) moto.sh: installing $(grep -v '^#' "$REQ" | xargs)" >> "$PIPLOG"
  ensure_venv
  export PIP_CACHE_DIR="$CACHE/pip" PIP_DISABLE_PIP_VERSION_CHECK=1
  local pyver
  pyver=$("$VENV/bin/python" -c 'import sys; print("py%d%d" % sys.version_info[:2])')
  local wheels="$CACHE/wheels/moto-$REQ_HASH-$pyver"
  mkdir -p "$CACHE/wheels"
  [ -f "$wheels/.complete" ] || with_lock pip-moto fill_wheels "$wheels"
  # --no-compile: byte-compiling botocore & co. at install takes ~10 s; imports compile lazily.
  if ! "$VENV/bin/pip" install -q --no-compile --no-index --find-links "$wheels" -r "$REQ" >>"$PIPLOG" 2>&1; then
    log "moto: install from $wheels failed, installing from PyPI instead"
    rm -rf "$wheels"
    "$VENV/bin/pip" install -q --no-compile -r "$REQ" >>"$PIPLOG" 2>&1 || fail moto "$PIPLOG" "pip install failed"
  fi
  rm -f "$VENV"/.polysync-moto-* "$VENV"/.polysync-requirements-*
  touch "$STAMP"
  log "moto: installed into $VENV ($(elapsed "$t"))"
}

t0=$(now_ms)
ensure_curl
if ready; then log "moto already running on 127.0.0.1:$PORT"; exit 0; fi
# Our moto_server still starting up (a parallel start): wait for it instead of starting another.
if pid_alive "$PIDFILE" moto_server; then
  if wait_ready 30 "$(cat "$PIDFILE")" ready; then log "moto already running on 127.0.0.1:$PORT"; exit 0; fi
  stop_pidfile moto "$PIDFILE" 10 moto_server
fi

venv_ok || install
need_free_port moto $PORT
pid=$(spawn "$PIDFILE" "$LOG" "$VENV/bin/moto_server" -H 127.0.0.1 -p $PORT)
rc=0; wait_ready 60 "$pid" ready || rc=$?
[ $rc = 0 ] || fail moto "$LOG" "$( [ $rc = 2 ] && echo "moto_server exited" || echo "no answer on $ENDPOINT after 60s")"
log "moto ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"
