#!/usr/bin/env bash
# `make bench`: run the harness (release build) against the local servers, then remove the
# keys it left in Redis. Arguments go to polysync-bench (--quick, --runs N, --changes N, ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
set -a && . ./.local/peers.env && set +a
PROFILE_DIR=release
[ "${BENCH_PROFILE:-release}" = dev ] && PROFILE_DIR=debug
BIN="${CARGO_TARGET_DIR:-$HOME/.cache/polysync/target}/$PROFILE_DIR/polysync-bench"
clean() {
  for p in 'lat:*' '{lat:*' 'fan:*' '{fan:*' 'bench:*' '{bench:*' 'base[0-9]*:*' '{base[0-9]*'; do
    redis-cli -p 56379 --scan --pattern "$p" | xargs -r -n 5000 redis-cli -p 56379 unlink >/dev/null
  done
}
clean
# The Debezium runner builds once (Maven); its first build downloads its dependencies.
if [ -x bench/debezium/run.sh ] || [ -f bench/debezium/run.sh ]; then
  bash bench/debezium/run.sh --build-only >/dev/null 2>&1 || echo "bench: the Debezium runner did not build; its column will be missing" >&2
fi
# The sink baselines' loaders (bench/loaders/sinks.py) use each server's most used Python client.
VENV=.local/bench-venv
if ! "$VENV/bin/python" -c 'import redis, gremlin_python' >/dev/null 2>&1; then
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q -r bench/loaders/requirements.txt; } >/dev/null 2>&1 \
    || echo "bench: could not build $VENV (pip); the sink baseline table will be missing" >&2
fi
"$BIN" "$@"
clean
