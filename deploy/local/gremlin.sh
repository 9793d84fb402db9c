#!/usr/bin/env bash
# Apache TinkerPop Gremlin Server with TinkerGraph on 127.0.0.1:58182 (config gremlin/):
#   ws://127.0.0.1:58182/gremlin   WebSocket (bytecode and scripts; GraphSON 2/3, GraphBinary)
#   http://127.0.0.1:58182/        HTTP POST {"gremlin":"g.V().count()"} (scripts)
# Vertex/edge ids of any type (strings like Neptune's), traversal source `g`.
# Jars from Maven Central (gremlin/pom.xml), copied once into $CACHE/gremlin-<version>/lib.
# Java 17 (lib.sh; gremlin-groovy 3.7 does not load on Java 25). JVM log: $STATE/gremlin.log.
#   gremlin.sh [start] | stop | status | check [-v]
# check: mergeV/mergeE upserts with string ids, twice (no duplicates); -v prints the answer.
# The graph is IN MEMORY ONLY: after a stop/start (or a crash) the graph is empty.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=58182
URL="http://127.0.0.1:$PORT"
DIR="$LOCAL_DIR/gremlin"
PIDFILE="$STATE/gremlin.pid"
LOG="$STATE/gremlin.log"
VERSION=$(sed -n 's:.*<tinkerpop.version>\(.*\)</tinkerpop.version>.*:\1:p' "$DIR/pom.xml")
[ -n "$VERSION" ] || die "gremlin: no <tinkerpop.version> in $DIR/pom.xml"
LIB="$CACHE/gremlin-$VERSION/lib"

# query SCRIPT: run a Gremlin (groovy) script over HTTP; prints the untyped GraphSON 3 answer.
# The script must not contain double quotes or backslashes (it is pasted into the JSON body).
query() {
  curl -sS -m 30 -H 'Content-Type: application/json' \
    -H 'Accept: application/vnd.gremlin-v3.0+json;types=false' \
    --data-binary "{\"gremlin\":\"$(tr '\n' ' ' <<<"$1")\"}" "$URL/" 2>/dev/null
}
ready() { query 'g.V().limit(1).count()' | grep -q '"code":200'; }

# check: upserts as the sink does them (mergeV/mergeE with string ids, run twice = no duplicate),
# then removes what it made.
check() {
  local id="polysync-check-$$" out
  local a="'$id-a'" b="'$id-b'" e="'$id-e'"
  local upsert="g.mergeV([(T.id): $a, (T.label): 'user']).option(Merge.onCreate, [name: 'a']).iterate();
    g.mergeV([(T.id): $b, (T.label): 'user']).iterate();
    g.mergeE([(T.id): $e, (T.label): 'follows', (Direction.OUT): $a, (Direction.IN): $b]).iterate();"
  out=$(query "$upsert $upsert
    [g.V($a, $b).count().next(), g.E($e).count().next(), g.V($a).out('follows').id().next(), g.V($a).values('name').next()]")
  query "g.V($a, $b).drop().iterate()" >/dev/null || true
  [ "${1:-}" = -v ] && echo "$out"
  echo "$out" | grep -q "\"data\":\[2,1,\"$id-b\",\"a\"\]" || die "gremlin check: mergeV/mergeE failed: $out"
  log "gremlin check ok: TinkerPop $VERSION on $URL, mergeV/mergeE with string ids (idempotent)"
}

case "${1:-start}" in
  stop) stop_pidfile gremlin "$PIDFILE" 30 GremlinServer; exit 0 ;;
  status) ready; exit ;;
  check) check "${2:-}"; exit 0 ;;
  start) ;;
  *) die "usage: gremlin.sh [start|stop|status|check [-v]]" ;;
esac

t0=$(now_ms)
ensure_curl
if ready; then log "gremlin already running on 127.0.0.1:$PORT"; exit 0; fi
# Our server still starting up (a parallel start): wait for it instead of starting another.
if pid_alive "$PIDFILE" GremlinServer; then
  wait_ready 120 "$(cat "$PIDFILE")" ready && { log "gremlin ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"; exit 0; }
  stop_pidfile gremlin "$PIDFILE" 10 GremlinServer
fi
need_free_port gremlin $PORT
ensure_java_maven

# The jars, copied out of ~/.m2 once per pom.xml content; the stamp marks a complete copy.
stamp="$CACHE/gremlin-$VERSION/.complete-$(hash_files "$DIR/pom.xml")"
if [ ! -f "$stamp" ] || ! ls "$LIB"/gremlin-server-"$VERSION".jar >/dev/null 2>&1; then
  log "gremlin: fetching gremlin-server $VERSION and its dependencies (Maven Central, ~/.m2)"
  rm -rf "$LIB" "$LIB.tmp" "$CACHE/gremlin-$VERSION"/.complete-*
  mkdir -p "$CACHE/gremlin-$VERSION"
  mvn_run -f "$DIR/pom.xml" dependency:copy-dependencies -DoutputDirectory="$LIB.tmp" \
    -DincludeScope=runtime >"$STATE/gremlin-mvn.log" 2>&1 \
    || fail gremlin "$STATE/gremlin-mvn.log" "mvn dependency:copy-dependencies failed"
  mv "$LIB.tmp" "$LIB"
  touch "$stamp"
fi

JAVA_OPTS=(-Xms256m -Xmx768m -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError
  -Dorg.slf4j.simpleLogger.showDateTime=true -Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS
  # as the distribution's bin/gremlin-server.sh does on Java 11+ (reflection in serializers)
  --add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.lang.invoke=ALL-UNNAMED
  --add-opens=java.base/java.lang.reflect=ALL-UNNAMED --add-opens=java.base/java.io=ALL-UNNAMED
  --add-opens=java.base/java.nio=ALL-UNNAMED --add-opens=java.base/java.net=ALL-UNNAMED
  --add-opens=java.base/java.util=ALL-UNNAMED --add-opens=java.base/java.util.concurrent=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED --add-opens=java.base/sun.nio.ch=ALL-UNNAMED)
cd "$DIR"   # the yaml's relative paths (tinkergraph.properties, init.groovy) resolve here
pid=$(spawn "$PIDFILE" "$LOG" "$JAVA_HOME/bin/java" "${JAVA_OPTS[@]}" -cp "$LIB/*" \
  org.apache.tinkerpop.gremlin.server.GremlinServer "$DIR/gremlin-server.yaml")
# The port opens once the server is fully initialised; then a script must run.
rc=0; wait_ready 120 "$pid" port_open 127.0.0.1 $PORT || rc=$?
if [ $rc = 0 ]; then wait_ready 20 "$pid" ready || rc=$?; fi
if [ $rc != 0 ]; then
  why="java exited"
  if [ $rc != 2 ]; then
    why="not ready on $URL: $(query 'g.V().limit(1).count()' | head -c 300)"
    stop_pidfile gremlin "$PIDFILE" 10 GremlinServer
  fi
  fail gremlin "$LOG" "$why"
fi
log "gremlin ready on 127.0.0.1:$PORT, TinkerPop $VERSION, empty in-memory graph ($(elapsed "$t0"))"
