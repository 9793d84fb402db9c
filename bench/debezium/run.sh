#!/usr/bin/env bash
# Debezium baseline runner for `make bench`: builds the fat jar once (rebuilt when pom.xml or a
# source changes), then runs it. `run.sh --build-only` only builds.
# Usage: run.sh host port db user password slot publication expected_events timeout_seconds
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
JAR="$DIR/target/drain-bench.jar"
if [ ! -f "$JAR" ] || [ -n "$(find "$DIR/pom.xml" "$DIR/src" -newer "$JAR" -type f 2>/dev/null | head -1)" ]; then
  (cd "$DIR" && mvn -q -B -DskipTests package) >&2
fi
[ "${1:-}" = "--build-only" ] && exit 0
exec java -Xmx1g -Dorg.slf4j.simpleLogger.defaultLogLevel=warn -jar "$JAR" "$@"
