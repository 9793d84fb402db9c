#!/usr/bin/env python3
"""Baseline loaders for `make bench`: the fastest straightforward way to put the fan-out
scenario's records into each sink's server with that server's most used Python client, so the
report can say how close polysync comes to what the server takes on this machine.

The records are the ones the fan-out pipelines make from the bench backlog
(bench/harness/workload.rs `backlog(n)`), regenerated here in change order:

* cache  — redis-py, pipelined EVALSHA of polysync's own version-guard script (read from
           src/sink/cache/sink.rs), 512 commands per round trip: the same work as polysync.
* cache-plain — redis-py, pipelined plain SET/DEL: the upper bound (no guard).
* search — `_bulk` over one HTTP connection, 500 documents per request, external_gte versions.
* graph  — gremlinpython, one traversal per 100 changes of mergeV/mergeV/mergeE side effects
           (what polysync sends), edge drops as g.E(ids).drop().
* influx — InfluxDB 1.x line protocol, 5000 points per POST.

Prints one JSON line: {"sink": ..., "records": N, "seconds": s}.
"""

import argparse
import http.client
import json
import re
import sys
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def plan(n):
    """The backlog's change counts, as workload.rs computes them."""
    products = n * 40 // 100
    orders = n * 10 // 100
    items = n * 10 // 100
    updates = n * 25 // 100
    item_deletes = items // 2
    product_deletes = n - products - orders - items - updates - item_deletes
    return products, orders, items, updates, item_deletes, product_deletes


def product_changes(n):
    """(op, id, row) for every products change, in order."""
    products, _, _, updates, _, product_deletes = plan(n)
    price = {}
    for i in range(1, products + 1):
        price[i] = (i % 1000) + 0.99
        yield "set", i, {"id": i, "sku": f"SKU-{i}", "name": f"Product {i}", "price": round(price[i], 2), "stock": 100}
    step = 50_000
    a = 0
    stock = {}
    while a < updates:
        b = min(a + step, updates)
        lo, hi = a % products, (b - 1) % products + 1
        for i in range(lo + 1, hi + 1):
            price[i] += 1
            stock[i] = stock.get(i, 100) - 1
            yield "set", i, {"id": i, "sku": f"SKU-{i}", "name": f"Product {i}", "price": round(price[i], 2), "stock": stock[i]}
        a = b
    for i in range(products - product_deletes + 1, products + 1):
        yield "del", i, None


def padded(v):
    return f"{v:040d}"


def chunks(it, size):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def cache(args, guarded):
    import redis

    r = redis.Redis.from_url(args.redis)
    script = re.search(r'GUARDED_WRITE: &str = r#"(.*?)"#;', (ROOT / "src/sink/cache/sink.rs").read_text(), re.S).group(1)
    sha = r.script_load(script)
    records, version = 0, 0
    t0 = time.monotonic()
    for batch in chunks(product_changes(args.n), 512):
        pipe = r.pipeline(transaction=False)
        for op, i, row in batch:
            version += 1
            key = f"{args.prefix}:product:{i}"
            if guarded:
                vkey = "{" + key + "}:__version"
                if op == "set":
                    pipe.evalsha(sha, 2, key, vkey, padded(version), "j", 0, 86400, json.dumps(row, separators=(",", ":")))
                else:
                    pipe.evalsha(sha, 2, key, vkey, padded(version), "d", 0, 86400, "0")
            elif op == "set":
                pipe.set(key, json.dumps(row, separators=(",", ":")))
            else:
                pipe.delete(key)
        pipe.execute()
        records += len(batch)
    return records, time.monotonic() - t0


def post(conn, path, body, content_type):
    conn.request("POST", path, body=body, headers={"Content-Type": content_type})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status >= 300:
        sys.exit(f"{path}: {resp.status} {data[:300]!r}")
    return data


def search(args):
    u = urllib.parse.urlparse(args.opensearch)
    conn = http.client.HTTPConnection(u.hostname, u.port or 9200, timeout=120)
    records, version = 0, 0
    t0 = time.monotonic()
    for batch in chunks(product_changes(args.n), 500):
        lines = []
        for op, i, row in batch:
            version += 1
            meta = {"_index": args.index, "_id": str(i), "version": version, "version_type": "external_gte"}
            if op == "set":
                lines.append(json.dumps({"index": meta}))
                lines.append(json.dumps(row, separators=(",", ":")))
            else:
                lines.append(json.dumps({"delete": meta}))
        post(conn, "/_bulk", ("\n".join(lines) + "\n").encode(), "application/x-ndjson")
        records += len(batch)
    return records, time.monotonic() - t0


def graph(args):
    from gremlin_python.driver.driver_remote_connection import DriverRemoteConnection
    from gremlin_python.process.anonymous_traversal import traversal
    from gremlin_python.process.graph_traversal import __
    from gremlin_python.process.traversal import Direction, Merge, T

    conn = DriverRemoteConnection(args.gremlin, "g")
    g = traversal().with_remote(conn)
    _, orders, items, _, item_deletes, _ = plan(args.n)
    p = args.prefix
    changes = []
    for i in range(1, items + 1):
        changes.append(("edge", (i % orders) + 1, i, i % 5000, 1 + i % 3))
    step, a = 50_000, 0
    while a < item_deletes:
        b = min(a + step, item_deletes)
        for i in range(a + 1, b + 1):
            changes.append(("drop", (i % orders) + 1, i, None, None))
        a = b
    records = 0
    t0 = time.monotonic()
    for batch in chunks(changes, 100):
        edges = [c for c in batch if c[0] == "edge"]
        drops = [f"{p}{o}:{pr}" for kind, o, pr, _, _ in batch if kind == "drop"]
        if edges:
            t = g.inject(1)
            for _, order, product, user, qty in edges:
                cid, pid, eid = f"{p}c:{user}", f"{p}p:{product}", f"{p}{order}:{product}"
                t = t.side_effect(__.merge_v({T.id: cid}).option(Merge.on_create, {T.label: "customer"}))
                t = t.side_effect(__.merge_v({T.id: pid}).option(Merge.on_create, {T.label: "product"}))
                t = t.side_effect(
                    __.merge_e({T.id: eid})
                    .option(Merge.on_create, {T.label: "bought", Direction.OUT: cid, Direction.IN: pid})
                    .property("qty", qty)
                )
            t.none().iterate()
        if drops:
            g.E(*drops).drop().iterate()
        records += len(batch)
    conn.close()
    return records, time.monotonic() - t0


def influx(args):
    u = urllib.parse.urlparse(args.influx)
    conn = http.client.HTTPConnection(u.hostname, u.port or 8086, timeout=120)
    _, orders, _, _, _, _ = plan(args.n)
    base = time.time_ns()
    records = 0
    t0 = time.monotonic()
    points = (
        f"order_value,region={'us-east-1' if i % 3 == 0 else 'eu-west-1'} total={(i % 500) + 0.5} {base + i * 1000}"
        for i in range(1, orders + 1)
    )
    for batch in chunks(points, 5000):
        post(conn, f"/write?db={args.database}&precision=n", ("\n".join(batch) + "\n").encode(), "text/plain")
        records += len(batch)
    return records, time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sink", required=True, choices=["cache", "cache-plain", "search", "graph", "influx"])
    ap.add_argument("--n", type=int, required=True, help="changes in the bench backlog")
    ap.add_argument("--prefix", default="base")
    ap.add_argument("--redis", default="redis://127.0.0.1:56379")
    ap.add_argument("--opensearch", default="http://127.0.0.1:59200")
    ap.add_argument("--index", default="bench-base")
    ap.add_argument("--gremlin", default="ws://127.0.0.1:58182/gremlin")
    ap.add_argument("--influx", default="http://127.0.0.1:58086")
    ap.add_argument("--database", default="bench")
    args = ap.parse_args()
    run = {
        "cache": lambda: cache(args, True),
        "cache-plain": lambda: cache(args, False),
        "search": lambda: search(args),
        "graph": lambda: graph(args),
        "influx": lambda: influx(args),
    }[args.sink]
    records, seconds = run()
    print(json.dumps({"sink": args.sink, "records": records, "seconds": round(seconds, 3)}))


if __name__ == "__main__":
    main()
