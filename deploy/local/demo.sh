#!/usr/bin/env bash
# `make demo`: an e-commerce database in PostgreSQL and a `profiles` table in DynamoDB (moto);
# polysync keeps a Redis cache, an OpenSearch index, a Gremlin graph and InfluxDB metrics in
# step with them. Prints what the daemon changed. Assumes `make peers` has run (make demo does).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BIN="${CARGO_TARGET_DIR:-$HOME/.cache/polysync/target}/debug/polysync"
CONFIG="$REPO_ROOT/config/local.toml"
[ -x "$BIN" ] || die "build the daemon first (make build)"
export PGPASSWORD=postgres
PSQL=(psql -h 127.0.0.1 -p 55432 -U postgres -v ON_ERROR_STOP=1 -qAt)
RCLI=(redis-cli -p 56379)
MOTO=http://127.0.0.1:55000
SEARCH=http://127.0.0.1:59200
INFLUX=http://127.0.0.1:58086
PY="$STATE/venv/bin/python"  # the venv make peers built for moto (has boto3)
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
# gremlin SCRIPT: run a read-only Gremlin script over the server's HTTP endpoint.
gremlin() {
  curl -fsS -H 'Content-Type: application/json' -H 'Accept: application/vnd.gremlin-v3.0+json;types=false' \
    -d "{\"gremlin\": \"$1\"}" http://127.0.0.1:58182/ | "$PY" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["result"]["data"]))'
}
METRICS=http://127.0.0.1:9464
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Fresh demo database 'shop' (schema: products, carts, cart_items, orders, order_items)"
"${PSQL[@]}" -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'polysync_demo'" >/dev/null
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS shop WITH (FORCE)" -c "CREATE DATABASE shop OWNER polysync" >/dev/null
PGPASSWORD=polysync psql -h 127.0.0.1 -p 55432 -U polysync -d shop -v ON_ERROR_STOP=1 -q -f "$LOCAL_DIR/demo/schema.sql"
PGPASSWORD=polysync psql -h 127.0.0.1 -p 55432 -U polysync -d shop -v ON_ERROR_STOP=1 -q <<'SQL'
INSERT INTO products (id, sku, name, price, stock)
  SELECT i, 'SKU-' || i, 'Product ' || i, (9.99 + i)::numeric(12,2), 100 FROM generate_series(1, 20) i;
INSERT INTO carts (id, user_id) SELECT i, 100 + i FROM generate_series(1, 5) i;
SQL
rm -rf "$REPO_ROOT/.local/demo-state"

say "Fresh DynamoDB table 'profiles' with a stream (NEW_AND_OLD_IMAGES), fresh index, graph and metrics"
"$PY" "$LOCAL_DIR/demo/profiles.py" "$MOTO" reset
curl -fsS -X DELETE "$SEARCH/products-v1" >/dev/null 2>&1 || true
gremlin "g.V().filter(id().is(TextP.startingWith('shop:'))).drop()" >/dev/null
curl -fsS -XPOST "$INFLUX/query" --data-urlencode "q=DROP DATABASE shop" >/dev/null

say "An application's cache before polysync runs (keys it would otherwise serve stale)"
"${RCLI[@]}" --scan --pattern 'cart:*' | xargs -r "${RCLI[@]}" del >/dev/null
"${RCLI[@]}" --scan --pattern 'user-cart:*' | xargs -r "${RCLI[@]}" del >/dev/null
"${RCLI[@]}" --scan --pattern 'order*' | xargs -r "${RCLI[@]}" del >/dev/null
"${RCLI[@]}" --scan --pattern 'product:*' | xargs -r "${RCLI[@]}" del >/dev/null
for i in 1 2 3 4 5; do "${RCLI[@]}" set "cart:$i" "{\"cached\":true}" >/dev/null; "${RCLI[@]}" set "user-cart:$((100 + i))" "$i" >/dev/null; done
for u in 101 102 103; do "${RCLI[@]}" set "orders:user:$u" "[]" >/dev/null; done
"${RCLI[@]}" --scan --pattern '*' | grep -E '^(cart|user-cart|orders):' | sort | tr '\n' ' '; echo

say "polysync check (offline validation and plan)"
"$BIN" check --config "$CONFIG"

say "Starting polysync (log: .local/demo.log)"
"$BIN" run --config "$CONFIG" >"$REPO_ROOT/.local/demo.log" 2>&1 &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null || true' EXIT
if ! wait_until 60 ready curl -fsS "$METRICS/readyz"; then
  tail -20 "$REPO_ROOT/.local/demo.log" >&2; die "daemon did not become ready"
fi
curl -fsS "$METRICS/readyz"
# The profiles stream starts at TRIM_HORIZON: wait until the seeded profile has been read, then
# cache the three profiles the DynamoDB edits below must invalidate.
seeded() { curl -fsS "$METRICS/metrics" | grep -q '^polysync_source_changes_total{.*source="profiles"'; }
wait_until 60 seeded seeded || die "the seeded DynamoDB profile was not read (see .local/demo.log)"
for u in 101 102 103; do "${RCLI[@]}" set "profile:$u" "{}" >/dev/null; done
echo "cached profile:101 profile:102 profile:103"

say "Workload: price changes, cart edits, orders, a deleted cart; three profile edits in DynamoDB"
PGPASSWORD=polysync psql -h 127.0.0.1 -p 55432 -U polysync -d shop -v ON_ERROR_STOP=1 -q <<'SQL'
UPDATE products SET price = price * 0.9, updated_at = now() WHERE id <= 5;
UPDATE products SET stock = stock - 3 WHERE id IN (2, 7);
INSERT INTO cart_items VALUES (1, 2, 1), (1, 7, 3), (2, 4, 1);
UPDATE cart_items SET qty = 2 WHERE cart_id = 1 AND product_id = 2;
BEGIN;
INSERT INTO orders (id, user_id, status, total) VALUES (1001, 101, 'placed', 31.97);
INSERT INTO order_items VALUES (1001, 2, 101, 2, 11.99), (1001, 7, 101, 1, 7.99);
DELETE FROM cart_items WHERE cart_id = 1;
COMMIT;
INSERT INTO orders (id, user_id, status, total) VALUES (1002, 102, 'placed', 15.99);
INSERT INTO order_items VALUES (1002, 2, 102, 1, 11.99), (1002, 9, 102, 1, 18.99);
INSERT INTO orders (id, user_id, status, region, total) VALUES (1003, 103, 'placed', 'us-east-1', 7.99);
INSERT INTO order_items VALUES (1003, 7, 103, 1, 7.99);
UPDATE orders SET status = 'paid' WHERE id = 1001;
DELETE FROM carts WHERE id = 5;
DELETE FROM products WHERE id = 20;
SQL
"$PY" "$LOCAL_DIR/demo/profiles.py" "$MOTO" edit
TARGET=$("${PSQL[@]}" -d shop -c "SELECT pg_current_wal_insert_lsn()")
caught_up() {
  [ "$("${PSQL[@]}" -d shop -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'polysync_demo' AND confirmed_flush_lsn >= '$TARGET'")" = 1 ]
}
wait_until 60 caught-up caught_up || die "the slot did not confirm the workload (see .local/demo.log)"
echo "slot polysync_demo confirmed past $TARGET: every change is applied in every sink"
profiles_done() { [ "$("${RCLI[@]}" exists profile:101 profile:102 profile:103)" = 0 ]; }
wait_until 60 profiles profiles_done || die "the DynamoDB profile edits did not arrive (see .local/demo.log)"

say "What polysync changed in Redis"
echo "invalidated (deleted) cache keys:"
for k in cart:1 cart:2 cart:3 cart:4 cart:5 user-cart:101 user-cart:102 user-cart:103 user-cart:104 user-cart:105 orders:user:101 orders:user:102 orders:user:103 profile:101 profile:102 profile:103; do
  if [ "$("${RCLI[@]}" exists "$k")" = 0 ]; then echo "  - $k"; fi
done
echo "kept (nothing changed for them):"
for k in cart:3 cart:4 user-cart:103 user-cart:104 orders:user:103; do
  if [ "$("${RCLI[@]}" exists "$k")" = 1 ]; then echo "  = $k"; fi
done
echo "products written as JSON, version-guarded (first 5, and deleted product 20):"
for i in 1 2 3 4 5 20; do printf '  product:%-3s %s\n' "$i" "$("${RCLI[@]}" get "product:$i")"; done
echo "database says product 1 costs $("${PSQL[@]}" -d shop -c 'SELECT price FROM products WHERE id = 1')"

say "Initial snapshots (product-search, product-graph: snapshot = \"initial\")"
snapshots_done() {
  "$BIN" status --json --config "$CONFIG" | "$PY" -c 'import json, sys
tasks = json.load(sys.stdin)["sources"]["shop"]["snapshots"]
sys.exit(0 if tasks and all(t.startswith("done") for t in tasks) else 1)'
}
wait_until 120 snapshots snapshots_done || die "the initial snapshots did not finish (see .local/demo.log)"
"$BIN" status --config "$CONFIG"
echo "search index holds $(curl -fsS -XPOST "$SEARCH/products/_refresh" >/dev/null; curl -fsS "$SEARCH/products/_count" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["count"])') products (the database: $("${PSQL[@]}" -d shop -c 'SELECT count(*) FROM products'))"

say "OpenSearch: products matching 'Product 2' (index products-v1 behind alias products; _version = commit LSN)"
curl -fsS -XPOST "$SEARCH/products/_refresh" >/dev/null
curl -fsS "$SEARCH/products/_search?q=name:%22Product%202%22&version=true" \
  | "$PY" -c 'import json,sys; [print("  ", h["_id"], h["_version"], h["_source"]) for h in json.load(sys.stdin)["hits"]["hits"]]'
echo "  product 20 (deleted) in the index: $(curl -s -o /dev/null -w '%{http_code}' "$SEARCH/products/_doc/20")"

say "Graph: customers who bought product 7 also bought..."
gremlin "g.V('shop:product:7').in('purchased').out('purchased').hasId(neq('shop:product:7')).dedup().values('name').fold()"
echo "  purchased edges: $(gremlin "g.E().filter(id().is(TextP.startingWith('shop:'))).count()")"

say "InfluxDB: order value and count per minute and region (points at each order's created_at)"
curl -fsS -G "$INFLUX/query" --data-urlencode "db=shop" \
  --data-urlencode "q=SELECT sum(total) AS value, count(total) AS orders FROM order_value WHERE time > now() - 1h GROUP BY time(1m), region fill(none)" \
  | "$PY" -c 'import json,sys; [print("  ", s["tags"]["region"], dict(zip(s["columns"], row))) for s in json.load(sys.stdin)["results"][0].get("series", []) for row in s["values"]]'

say "Metrics (excerpt of $METRICS/metrics)"
curl -fsS "$METRICS/metrics" | grep -E '^polysync_(source_changes_total|pipeline_outputs_total|sink_records_total|dlq_entries_total|ddb_shards_owned)' | sort

say "Stopping polysync with SIGTERM (drains, confirms, exits 0)"
kill -TERM $DAEMON
wait $DAEMON && echo "polysync exited 0" || die "polysync exited with $?"
trap - EXIT
