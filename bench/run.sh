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
  for p in 'lat:*' '{lat:*' 'fan:*' '{fan:*' 'bench:*' '{bench:*'; do
    redis-cli -p 56379 --scan --pattern "$p" | xargs -r -n 5000 redis-cli -p 56379 unlink >/dev/null
  done
}
clean
# The Debezium runner builds once (Maven); its first build downloads its dependencies.
if [ -x bench/debezium/run.sh ] || [ -f bench/debezium/run.sh ]; then
  bash bench/debezium/run.sh --build-only >/dev/null 2>&1 || echo "bench: the Debezium runner did not build; its column will be missing" >&2
fi
"$BIN" "$@"
clean
