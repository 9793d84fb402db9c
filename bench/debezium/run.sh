#!/usr/bin/env bash
# Debezium baseline runner for `make bench` (see README.md here): builds the fat jar once (again
# only when pom.xml or a source is newer than it), then runs it with the arguments passed through.
#   run.sh host port db user password slot publication expected_events timeout_seconds
#          [--tables s.t,...] [--debezium.PROPERTY=VALUE ...]
#          [--consumer noop|redis] [--redis HOST:PORT] [--key TABLE=PREFIX{COLUMN} ...]
#          [--until-table TABLE] [--ready-file PATH]
#   run.sh --build-only
# noop (default) counts change events; redis also DELs each event's cache key (--key, repeatable;
# Redis 127.0.0.1:56379 by default), pipelined per Debezium batch, acknowledging the batch after
# Redis replied. Backlog mode ends after expected_events; with --until-table it ends at the first
# change of TABLE (not counted; expected_events may be 0), and --ready-file PATH is created once
# the slot is being streamed. Prints one JSON line on stdout; exit 1 on failure, 2 on bad usage.
# Maven's repository is its default (~/.m2) unless MAVEN_REPO is set; JAVA picks the java binary.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
JAR="$DIR/target/drain-bench.jar"
if [ ! -f "$JAR" ] || [ -n "$(find "$DIR/pom.xml" "$DIR/src" -newer "$JAR" -type f 2>/dev/null | head -1)" ]; then
  (cd "$DIR" && mvn -q -B -Dstyle.color=never -DskipTests ${MAVEN_REPO:+-Dmaven.repo.local="$MAVEN_REPO"} package) >&2 || { rm -f "$JAR"; echo "run.sh: the Maven build failed" >&2; exit 1; }
fi
[ "${1:-}" = "--build-only" ] && exit 0
exec "${JAVA:-java}" -Xmx1g -Dorg.slf4j.simpleLogger.defaultLogLevel=warn -jar "$JAR" "$@"
