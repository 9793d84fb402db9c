#!/usr/bin/env bash
# Start the local servers tests and the demo use (default: all), or stop them:
#   peers.sh [name...]          start (idempotent; already running = no-op)
#   peers.sh --stop [name...]   stop (data kept, so a later start resumes)
# Names: postgres redis prometheus. Writes $STATE/peers.env with the addresses.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL=(postgres redis prometheus)
action=start
if [ "${1:-}" = "--stop" ]; then action=stop; shift; fi
names=("$@"); [ ${#names[@]} -eq 0 ] && names=("${ALL[@]}")
for n in "${names[@]}"; do
  [ -f "$LOCAL_DIR/$n.sh" ] || die "unknown peer $n (known: ${ALL[*]})"
done
if [ $action = stop ]; then
  for n in "${names[@]}"; do bash "$LOCAL_DIR/$n.sh" stop; done
  exit 0
fi
for n in "${names[@]}"; do bash "$LOCAL_DIR/$n.sh" start; done
cat > "$STATE/peers.env" <<ENV
export POLYSYNC_TEST_PG=postgres://postgres:postgres@127.0.0.1:55432/postgres
export POLYSYNC_TEST_PG_CA=$STATE/pg-tls/ca.crt
export POLYSYNC_TEST_REDIS=redis://127.0.0.1:56379
ENV
