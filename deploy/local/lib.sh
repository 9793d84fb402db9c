#!/usr/bin/env bash
# Shared helpers for the local peer scripts. Source it; do not run it.
#
#   STATE  (${POLYSYNC_LOCAL:-<repo>/.local})   data dirs, logs, pidfiles, the python venv
#   CACHE  (${XDG_CACHE_HOME:-~/.cache}/polysync) pip wheels, resolved Maven classpaths, build output
#                                                 (Maven's own artifacts stay in ~/.m2)
set -euo pipefail

LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LOCAL_DIR/../.." && pwd)"
STATE="${POLYSYNC_LOCAL:-$REPO_ROOT/.local}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/polysync"
mkdir -p "$STATE" "$CACHE"
STATE="$(cd "$STATE" && pwd)"

log() { echo "peers: $*" >&2; }
die() { echo "peers: ERROR: $*" >&2; exit 1; }

# fail NAME LOGFILE MESSAGE: print the tail of a server's log and exit non-zero.
fail() {
  local name=$1 logfile=$2; shift 2
  if [ -f "$logfile" ]; then
    echo "peers: ---- last 40 lines of $logfile ----" >&2
    tail -n 40 "$logfile" >&2 || true
    echo "peers: ---- end of $logfile ----" >&2
  fi
  die "$name: $*"
}

# with_lock NAME COMMAND...: run COMMAND holding an exclusive machine-wide lock, so peer scripts
# started in parallel do not run apt/dpkg or Maven against the same local repository at once.
with_lock() {
  local name=$1; shift
  ( flock -w 900 9 || die "timed out waiting for the $name lock"; "$@" ) 9>"$CACHE/$name.lock"
}

# apt_ensure PACKAGE...: apt-get install the packages that are missing. `apt-get update` runs
# only when an install is needed, and at most once a day (marker in $CACHE).
apt_ensure() {
  local missing=() p
  for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  with_lock apt _apt_install "$@"
}
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
_apt_install() {
  local missing=() p
  for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done   # another script may have won
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
  [ "$(id -u)" = 0 ] || die "need root to apt-get install ${missing[*]}"
  local marker="$CACHE/apt-updated" t0=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "$(find "$marker" -mmin -1440 2>/dev/null)" ]; then
    log "apt-get update"
    apt-get update -qq >>"$STATE/apt.log" 2>&1 || fail apt "$STATE/apt.log" "apt-get update failed"
    touch "$marker"
  fi
  log "installing ${missing[*]} (apt-get)"
  # Keep the packages' maintainer scripts from starting their own copies of the servers.
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
  fi
  local rc=0 aptlog="$STATE/apt.log"
  echo "==== $(date -Is) apt-get install ${missing[*]}" >> "$aptlog"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$aptlog" 2>&1 </dev/null 9>&- || rc=$?
  if [ $rc -ne 0 ]; then   # stale package lists: refresh once and retry
    log "apt-get install failed, retrying after apt-get update"
    apt-get update -qq >>"$aptlog" 2>&1 && touch "$marker"
    rc=0; apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$aptlog" 2>&1 </dev/null 9>&- || rc=$?
  fi
  if [ $own_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  [ $rc -eq 0 ] || fail apt "$aptlog" "apt-get install ${missing[*]} failed"
  log "installed ${missing[*]} ($((SECONDS - t0))s)"
}

# Java 17 (the machine default) and Maven, for the JVM peers. Java 17 is used even when the
# caller's JAVA_HOME points elsewhere (OpenSearch 2.x and this Gremlin Server are run on 17);
# POLYSYNC_JAVA_HOME overrides.
JAVA17_HOME=/usr/lib/jvm/java-17-openjdk-amd64
ensure_java_maven() {
  if [ -z "${POLYSYNC_JAVA_HOME:-}" ] && [ ! -x "$JAVA17_HOME/bin/javac" ]; then apt_ensure openjdk-17-jdk-headless; fi
  command -v mvn >/dev/null || apt_ensure maven
  JAVA_HOME=${POLYSYNC_JAVA_HOME:-$JAVA17_HOME}
  [ -x "$JAVA_HOME/bin/java" ] || die "no java in $JAVA_HOME"
  export JAVA_HOME
}

# mvn_run ARGS...: batch-mode Maven, serialised machine-wide (shared ~/.m2).
mvn_run() { with_lock maven mvn -B -q "$@"; }

# classpath_ok FILE: every entry of a saved classpath still exists (the ~/.m2 jars are there).
classpath_ok() {
  [ -s "$1" ] || return 1
  local e
  while IFS= read -r -d: e || [ -n "$e" ]; do
    [ -e "$e" ] || return 1
  done < <(tr -d '\n' < "$1")
}

# hash_files FILE...: a short content hash, to know when a cached build is stale.
hash_files() { cat "$@" | sha256sum | cut -c1-16; }

# port_open HOST PORT
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# need_free_port NAME PORT...: die if something that is not our server already listens there.
need_free_port() {
  local name=$1 port; shift
  for port in "$@"; do
    if port_open 127.0.0.1 "$port"; then
      local who; who=$(ss -ltnpH "sport = :$port" 2>/dev/null | grep -o 'users:.*' | head -1 || true)
      die "$name: 127.0.0.1:$port is taken by another program that does not answer like $name ${who:+($who)}"
    fi
  done
}

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s.
wait_until() {
  local secs=$1; shift 2   # $2 names what is awaited, for the reader
  local start=$SECONDS
  while ! "$@" >/dev/null 2>&1; do
    if (( SECONDS - start >= secs )); then
      return 1
    fi
    sleep 0.2
  done
}

# wait_ready SECONDS PID COMMAND...: like wait_until, but give up as soon as PID has exited.
wait_ready() {
  local secs=$1 pid=$2; shift 2
  local start=$SECONDS
  while ! "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || return 2
    (( SECONDS - start >= secs )) && return 1
    sleep 0.25
  done
}

# pid_alive PIDFILE [PATTERN]: the pid in PIDFILE is alive (and its command line contains
# PATTERN, so a stale pidfile whose pid was reused by another program is not mistaken for ours).
pid_alive() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  [ -z "${2:-}" ] || tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2"
}

# spawn PIDFILE LOGFILE COMMAND...: start COMMAND detached (own session, stdin from /dev/null,
# output appended to LOGFILE), record its pid. Prints the pid.
spawn() {
  local pidfile=$1 logfile=$2; shift 2
  mkdir -p "$(dirname "$logfile")"
  echo "==== $(date -Is) starting: $*" >> "$logfile"
  nohup setsid "$@" >>"$logfile" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" > "$pidfile"
  echo "$pid"
}

# stop_pidfile NAME PIDFILE [SECONDS [PATTERN]]: TERM, wait (default 30 s), then KILL.
stop_pidfile() {
  local name=$1 pidfile=$2 secs=${3:-30} pattern=${4:-}
  if pid_alive "$pidfile" "$pattern"; then
    local pid i
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not stop in ${secs}s, killing it"
      kill -9 "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    log "$name stopped"
  else
    log "$name not running"
  fi
  rm -f "$pidfile"
}

# http_ok URL: a 2xx answer.
http_ok() { curl -fsS -m 5 -o /dev/null "$1" 2>/dev/null; }

ensure_curl() { command -v curl >/dev/null || apt_ensure curl; }

# elapsed START_MS: time since START_MS (from now_ms), e.g. "2.1s", for the log lines.
now_ms() { date +%s%3N; }
elapsed() { local ms=$(( $(now_ms) - $1 )); printf '%d.%ds' $((ms / 1000)) $(((ms % 1000) / 100)); }
