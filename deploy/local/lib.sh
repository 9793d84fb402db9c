#!/usr/bin/env bash
# Shared helpers for the local peer scripts. Source it; do not run it.
set -euo pipefail

LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LOCAL_DIR/../.." && pwd)"
STATE="${POLYSYNC_LOCAL:-$REPO_ROOT/.local}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/polysync"
mkdir -p "$STATE" "$CACHE"

log() { echo "peers: $*" >&2; }
die() { echo "peers: ERROR: $*" >&2; exit 1; }

# apt-get install the named packages if any is missing; `apt-get update` at most once per run.
apt_ensure() {
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} (apt-get)"
  if [ ! -f "$STATE/.apt-updated" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 && touch "$STATE/.apt-updated"
  fi
  # Do not let package scripts start their own copies of the servers.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  rm -f /usr/sbin/policy-rc.d
}

# port_open HOST PORT
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_until SECONDS DESCRIPTION COMMAND...
wait_until() {
  local secs=$1 what=$2; shift 2
  local start=$SECONDS
  while ! "$@" >/dev/null 2>&1; do
    if (( SECONDS - start >= secs )); then
      return 1
    fi
    sleep 0.2
  done
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pidfile NAME PIDFILE: TERM, wait, then KILL.
stop_pidfile() {
  local name=$1 pidfile=$2
  if pid_alive "$pidfile"; then
    local pid; pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    log "$name stopped"
  fi
  rm -f "$pidfile"
}
