#!/usr/bin/env bash
# Apache TinkerPop Gremlin Server (TinkerGraph, ids of any type) on 127.0.0.1:58182, WebSocket at
# /gremlin and HTTP POST at / (WsAndHttpChannelizer). Jars from Maven Central via gremlin/pom.xml
# (kept in ~/.m2; the resolved classpath is cached in $CACHE). Java 17.
#   gremlin.sh [start] | stop | status
# The graph is saved to $STATE/gremlin/graph.json on a clean stop and loaded on start.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT=58182
DIR="$LOCAL_DIR/gremlin"
DATA="$STATE/gremlin"
PIDFILE="$STATE/gremlin.pid"
LOG="$STATE/gremlin.log"
query() {  # query GREMLIN-SCRIPT: HTTP POST, prints the JSON answer
  curl -fsS -m 10 -H 'Content-Type: application/json' -d "{\"gremlin\":\"$1\"}" "http://127.0.0.1:$PORT/" 2>/dev/null
}
ready() { query 'g.V().limit(1).count()' | grep -q '"code":200'; }

case "${1:-start}" in
  stop) stop_pidfile gremlin "$PIDFILE" 30; exit 0 ;;
  status) ready; exit ;;
  start) ;;
  *) die "usage: gremlin.sh [start|stop|status]" ;;
esac

t0=$(now_ms)
ensure_curl
if ready; then log "gremlin already running on 127.0.0.1:$PORT"; exit 0; fi
if pid_alive "$PIDFILE"; then   # started by someone else, still booting
  wait_ready 120 "$(cat "$PIDFILE")" ready && { log "gremlin ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"; exit 0; }
  stop_pidfile gremlin "$PIDFILE" 10
fi
ensure_java_maven

CP="$CACHE/gremlin-$(hash_files "$DIR/pom.xml").classpath"
if ! classpath_ok "$CP"; then
  log "gremlin: resolving gremlin-server from Maven Central (cached in ~/.m2)"
  mvn_run -f "$DIR/pom.xml" dependency:build-classpath -Dmdep.outputFile="$CP.tmp" >"$STATE/gremlin-mvn.log" 2>&1 \
    || fail gremlin "$STATE/gremlin-mvn.log" "mvn dependency:build-classpath failed"
  mv "$CP.tmp" "$CP"
fi

mkdir -p "$DATA"
# A graph.json cut short by a kill -9 during the save would stop the server from starting.
if [ -f "$DATA/graph.json" ] && [ ! -s "$DATA/graph.json" ]; then rm -f "$DATA/graph.json"; fi
JAVA_OPTS=(-Xms128m -Xmx512m -XX:+UseSerialGC -Dpolysync.gremlin.data="$DATA"
  -Dslf4j.internal.verbosity=WARN -Dorg.slf4j.simpleLogger.showDateTime=true
  --add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.lang.invoke=ALL-UNNAMED
  --add-opens=java.base/java.lang.reflect=ALL-UNNAMED --add-opens=java.base/java.io=ALL-UNNAMED
  --add-opens=java.base/java.nio=ALL-UNNAMED --add-opens=java.base/java.net=ALL-UNNAMED
  --add-opens=java.base/java.util=ALL-UNNAMED --add-opens=java.base/java.util.concurrent=ALL-UNNAMED
  --add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED --add-opens=java.base/sun.nio.ch=ALL-UNNAMED)
cd "$DIR"   # the yaml's relative paths (tinkergraph.properties, init.groovy) resolve here
pid=$(spawn "$PIDFILE" "$LOG" "$JAVA_HOME/bin/java" "${JAVA_OPTS[@]}" -cp "$(cat "$CP")" \
  org.apache.tinkerpop.gremlin.server.GremlinServer "$DIR/gremlin-server.yaml")
rc=0; wait_ready 120 "$pid" ready || rc=$?
[ $rc = 0 ] || fail gremlin "$LOG" "$( [ $rc = 2 ] && echo "java exited" || echo "no answer on 127.0.0.1:$PORT after 120s")"
log "gremlin ready on 127.0.0.1:$PORT ($(elapsed "$t0"))"
