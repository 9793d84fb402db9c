//! The conformance matrix: one meaning for every change in every sink.
//!
//! Each case is a source table and a statement sequence. Every case runs through every sink and
//! mode at once (cache invalidate, cache set as JSON and as a hash, search, graph, time series),
//! on one daemon. Afterwards each derived store is compared, key by key and value by value, with
//! what a small reference model computes from the final table: the expected state is never
//! written by hand.
//!
//! The model, per mode:
//! * cache set (JSON): every row's key holds exactly the row, or is absent (a JSON value that
//!   cannot be completed is removed, never shrunk); no other key exists.
//! * cache set (hash): every row's key holds exactly its non-NULL columns; no other key.
//! * cache invalidate: before every statement the test fills every row's key, as a reading
//!   application would; afterwards each key is absent or holds its row's current value.
//! * search: one document per row, equal to the row; no other document.
//! * graph: one vertex per row with the row's properties; no other vertex.
//! * time series: per row, the newest point of its series holds the row's fields.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::converge::{Docs, diff, gremlin_query, influx_drop, influx_q, pg_rows, search_docs};
use crate::support::daemon::ChildDaemon;
use crate::support::pg::{TestDb, connect};
use crate::support::redis::TestRedis;
use crate::support::{Workspace, free_port, http_get, shared, unique, wait_for};

const WAIT: Duration = Duration::from_secs(180);

/// A large, poorly compressible text: stored out of line (TOAST), so an update that leaves it
/// alone sends it as "unchanged".
const BIG: &str = "(SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 2500) g)";

/// One case of the matrix.
struct Case {
    /// Table name (and the case's name in every sink).
    name: &'static str,
    /// Schema of the table (`public` unless a case needs another).
    schema: &'static str,
    /// Everything before the table's value columns: its key columns and constraints, in SQL,
    /// with `{t}` for the qualified table name. The value columns `name text, qty int, big
    /// text` are appended.
    key_ddl: &'static str,
    /// Statements run after the table exists (types, replica identity).
    setup: &'static [&'static str],
    /// The key columns in table column order: how templates and the model name a row.
    key: &'static [&'static str],
    /// Rows written before the daemon starts; the pipelines snapshot them (`snapshot = "initial"`).
    seed: &'static [&'static str],
    /// The statement sequence, run once the daemon is ready, each in its own transaction
    /// (a statement may itself be `BEGIN; …; COMMIT`).
    statements: &'static [&'static str],
    /// Keep updating seeded rows while the initial snapshot runs.
    race_snapshot: bool,
    /// Run the statements the moment `/readyz` first answers 200 (writes right after ready).
    at_ready: bool,
}

fn cases() -> Vec<Case> {
    let base = |name| Case {
        name,
        schema: "public",
        key_ddl: "id bigint PRIMARY KEY",
        setup: &[],
        key: &["id"],
        seed: &[],
        statements: &[],
        race_snapshot: false,
        at_ready: false,
    };
    vec![
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 20) i",
                "INSERT INTO {t} (id, name, qty) VALUES (21, NULL, NULL)",
            ],
            ..base("c_insert")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 20) i",
                "UPDATE {t} SET qty = qty * 10, name = 'updated' WHERE id % 2 = 0",
                "UPDATE {t} SET name = NULL WHERE id = 3",
            ],
            ..base("c_update")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 10) i",
                "UPDATE {t} SET id = 106 WHERE id = 5",
                "UPDATE {t} SET id = id + 1000 WHERE id IN (1, 2)",
                "UPDATE {t} SET id = 1001, qty = 7 WHERE id = 1001",
            ],
            ..base("c_keychange")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 10) i",
                "UPDATE {t} SET id = 6000 WHERE id = 5",
                "INSERT INTO {t} (id, name, qty) VALUES (5, 'back again', 55)",
                "BEGIN; UPDATE {t} SET id = 7000 WHERE id = 7; INSERT INTO {t} (id, name, qty) VALUES (7, 'same tx', 77); COMMIT",
            ],
            ..base("c_keychange_reinsert")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty, big) SELECT i, 'n' || i, i, {big} FROM generate_series(1, 6) i",
                "UPDATE {t} SET qty = qty + 1 WHERE id <= 4",
                "UPDATE {t} SET name = 'renamed' WHERE id = 2",
            ],
            ..base("c_toast")
        },
        Case {
            setup: &["ALTER TABLE {t} REPLICA IDENTITY FULL"],
            statements: &[
                "INSERT INTO {t} (id, name, qty, big) SELECT i, 'n' || i, i, {big} FROM generate_series(1, 6) i",
                "UPDATE {t} SET qty = qty + 1 WHERE id <= 4",
                "UPDATE {t} SET id = 60 WHERE id = 6",
            ],
            ..base("c_toast_full")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 20) i",
                "DELETE FROM {t} WHERE id % 3 = 0",
                "DELETE FROM {t} WHERE id = 1",
            ],
            ..base("c_delete")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'old' || i, i FROM generate_series(1, 30) i",
                "TRUNCATE {t}",
                "INSERT INTO {t} (id, name, qty) SELECT i, 'new' || i, i FROM generate_series(25, 40) i",
                "UPDATE {t} SET qty = 0 WHERE id = 30",
            ],
            ..base("c_truncate")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'old' || i, i FROM generate_series(1, 10) i",
                "BEGIN; INSERT INTO {t} (id, name, qty) VALUES (11, 'before', 1); TRUNCATE {t}; INSERT INTO {t} (id, name, qty) VALUES (12, 'after', 2), (3, 'after', 3); COMMIT",
            ],
            ..base("c_truncate_tx")
        },
        Case {
            statements: &[
                "INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 5) i",
                "BEGIN; INSERT INTO {t} (id, name, qty) VALUES (100, 'never', 1); UPDATE {t} SET name = 'never' WHERE id = 1; DELETE FROM {t} WHERE id = 2; ROLLBACK",
            ],
            ..base("c_rollback")
        },
        Case {
            statements: &["INSERT INTO {t} (id, name, qty) SELECT i, 'first' || i, i FROM generate_series(1, 50) i"],
            at_ready: true,
            ..base("c_ready")
        },
        // Key shapes: each is seeded (read by the initial snapshot) and changed while the
        // snapshot runs, so stream and snapshot must agree on the key and the lane.
        Case {
            key_ddl: "a int NOT NULL, b text NOT NULL, PRIMARY KEY (b, a)",
            key: &["a", "b"],
            seed: &[
                "INSERT INTO {t} (a, b, name, qty) SELECT i % 7, 'k' || (i / 7), 'n' || i, i FROM generate_series(1, 3000) i",
            ],
            statements: &[
                "UPDATE {t} SET qty = -qty WHERE a = 3",
                "UPDATE {t} SET a = a + 100 WHERE b = 'k5'",
                "DELETE FROM {t} WHERE a = 1 AND b < 'k3'",
            ],
            race_snapshot: true,
            ..base("c_key_composite")
        },
        Case {
            key_ddl: "id bigint NOT NULL, code text NOT NULL",
            setup: &[
                "CREATE UNIQUE INDEX {name}_code ON {t} (code)",
                "ALTER TABLE {t} REPLICA IDENTITY USING INDEX {name}_code",
            ],
            key: &["code"],
            seed: &[
                "INSERT INTO {t} (id, code, name, qty) SELECT i, 'c-' || i, 'n' || i, i FROM generate_series(1, 3000) i",
            ],
            statements: &[
                "UPDATE {t} SET qty = qty + 1 WHERE id % 5 = 0",
                "UPDATE {t} SET code = code || '-moved' WHERE id % 50 = 0",
                "DELETE FROM {t} WHERE id % 97 = 0",
            ],
            race_snapshot: true,
            ..base("c_key_identity_index")
        },
        Case {
            schema: "conf_s",
            key_ddl: "k conf_s.mood PRIMARY KEY",
            setup: &[],
            key: &["k"],
            seed: &["INSERT INTO {t} (k, name, qty) VALUES ('sad', 's', 1), ('ok', 'o', 2), ('happy', 'h', 3)"],
            statements: &["UPDATE {t} SET qty = 20 WHERE k = 'ok'", "UPDATE {t} SET k = 'meh' WHERE k = 'sad'"],
            race_snapshot: true,
            ..base("c_key_enum")
        },
        Case {
            schema: "conf_s",
            key_ddl: "k conf_s.pos PRIMARY KEY",
            key: &["k"],
            seed: &["INSERT INTO {t} (k, name, qty) SELECT i, 'n' || i, i FROM generate_series(1, 2000) i"],
            statements: &["UPDATE {t} SET name = 'x' WHERE k % 9 = 0", "DELETE FROM {t} WHERE k % 11 = 0"],
            race_snapshot: true,
            ..base("c_key_domain")
        },
        Case {
            key_ddl: "u uuid PRIMARY KEY",
            key: &["u"],
            seed: &[
                "INSERT INTO {t} (u, name, qty) SELECT md5(i::text)::uuid, 'n' || i, i FROM generate_series(1, 2000) i",
            ],
            statements: &["UPDATE {t} SET qty = 0 WHERE qty % 3 = 0"],
            race_snapshot: true,
            ..base("c_key_uuid")
        },
        Case {
            key_ddl: "t text PRIMARY KEY",
            key: &["t"],
            seed: &[
                "INSERT INTO {t} (t, name, qty) VALUES ('ünïcödé ✓', 'u', 1), ('it''s \"quoted\"', 'q', 2), ('a:b:c', 'c', 3), ('{braces}', 'b', 4), ('trailing ', 's', 5)",
                "INSERT INTO {t} (t, name, qty) SELECT 'row ' || i, 'n' || i, i FROM generate_series(1, 2000) i",
            ],
            statements: &[
                "UPDATE {t} SET qty = qty + 100 WHERE t IN ('ünïcödé ✓', 'a:b:c', '{braces}')",
                "UPDATE {t} SET t = 'it''s moved' WHERE t = 'it''s \"quoted\"'",
            ],
            race_snapshot: true,
            ..base("c_key_text")
        },
        Case {
            seed: &["INSERT INTO {t} (id, name, qty) SELECT i, 'n' || i, 0 FROM generate_series(1, 6000) i"],
            statements: &["UPDATE {t} SET qty = qty + 1000 WHERE id % 100 = 0"],
            race_snapshot: true,
            ..base("c_snapshot_race")
        },
    ]
}

/// The key text templates render: key columns joined by `|`.
fn key_template(c: &Case) -> String {
    c.key.iter().map(|k| format!("{{{{ key.{k} }}}}")).collect::<Vec<_>>().join("|")
}

/// The same key text computed by PostgreSQL from the table.
fn key_sql(c: &Case) -> String {
    c.key.iter().map(|k| format!("r.{k}::text")).collect::<Vec<_>>().join(" || '|' || ")
}

fn qualified(c: &Case) -> String {
    format!("{}.{}", c.schema, c.name)
}

fn sql(c: &Case, s: &str) -> String {
    s.replace("{t}", &qualified(c)).replace("{name}", c.name).replace("{big}", BIG)
}

struct Run {
    prefix: String,
}

impl Run {
    fn cache(&self, c: &Case, mode: &str) -> String {
        format!("{}:{}:{mode}:", self.prefix, c.name)
    }
    fn index(&self, c: &Case) -> String {
        format!("{}-{}", self.prefix, c.name).to_lowercase().replace('_', "-")
    }
    fn index_prefix(&self) -> String {
        self.prefix.to_lowercase().replace('_', "-")
    }
    fn vertex(&self, c: &Case) -> String {
        format!("{}:{}:", self.prefix, c.name)
    }
    fn influx_db(&self) -> String {
        self.prefix.replace('-', "_")
    }
}

fn pipelines(ws: &Workspace, run: &Run, c: &Case) {
    let t = qualified(c);
    let key = key_template(c);
    let snap = if c.seed.is_empty() { "" } else { "snapshot = \"initial\"\n" };
    let head =
        |mode: &str| format!("name = \"{}-{mode}\"\nsource = \"db\"\n{snap}[match]\nrelations = [\"{t}\"]\n", c.name);
    let set = |mode: &str, format: &str| {
        format!(
            "{}[[sink]]\ntarget = \"cache\"\naction = \"set\"\nformat = \"{format}\"\nkey = \"{}{key}\"\ntruncate_pattern = \"{}*\"\n",
            head(mode),
            run.cache(c, mode),
            run.cache(c, mode)
        )
    };
    ws.write_pipeline(&format!("{}-json", c.name), &set("json", "json"));
    ws.write_pipeline(&format!("{}-hash", c.name), &set("hash", "hash"));
    ws.write_pipeline(
        &format!("{}-inv", c.name),
        &format!(
            "{}[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"{}{key}\"]\ntruncate_pattern = \"{}*\"\n",
            head("inv"),
            run.cache(c, "inv"),
            run.cache(c, "inv")
        ),
    );
    ws.write_pipeline(
        &format!("{}-search", c.name),
        &format!("{}[[sink]]\ntarget = \"search\"\nindex = \"{}\"\nid = \"{key}\"\n", head("search"), run.index(c)),
    );
    ws.write_pipeline(
        &format!("{}-graph", c.name),
        &format!(
            "{}[[sink]]\ntarget = \"graph\"\n[[sink.vertex]]\nlabel = \"{}\"\nid = \"{}{key}\"\non_delete = \"drop\"\nproperties = {{ name = \"after.name\", qty = \"after.qty\", big = \"after.big\" }}\n",
            head("graph"),
            c.name,
            run.vertex(c)
        ),
    );
    ws.write_pipeline(
        &format!("{}-points", c.name),
        &format!(
            "{}[[sink]]\ntarget = \"metrics\"\n[[sink.point]]\nmeasurement = \"{}\"\ntags = {{ k = \"{key}\" }}\nfields = {{ qty = {{ path = \"after.qty\", type = \"bigint\" }}, name = {{ path = \"after.name\", type = \"varchar\" }} }}\n",
            head("points"),
            c.name
        ),
    );
}

fn config(db: &TestDb, slot: &str, run: &Run, port: u16) -> String {
    format!(
        r#"
state_dir = "state"
pipelines = "pipelines"

[runtime]
lanes = 4
shutdown_timeout = "20s"

[metrics]
listen = "127.0.0.1:{port}"

[reload]
watch = false

[sources.db]
kind = "postgres"
url = "{db}"
sslmode = "disable"
slot = "{slot}"
publication = "{slot}"
create_if_missing = true
status_interval = "100ms"

[sources.db.snapshot]
chunk_size = 500
parallelism = 4

[sinks.cache]
kind = "cache"
url = "{redis}"

[sinks.search]
kind = "search"
url = "{search}"
linger = "2ms"

[sinks.graph]
kind = "graph"
url = "{gremlin}"

[sinks.metrics]
kind = "timeseries"
engine = "influxdb"
url = "{influx}"
database = "{influxdb}"
create_database = true
linger = "2ms"
"#,
        db = db.url,
        redis = crate::support::redis::url(),
        search = crate::support::search::url(),
        gremlin = crate::support::converge::gremlin_url(),
        influx = crate::support::converge::influx_url(),
        influxdb = run.influx_db(),
    )
}

/// Rows of a case as the model sees them: key text → every column (value columns as JSON).
async fn model(db: &TestDb, c: &Case) -> Docs {
    pg_rows(&db.client, &format!("SELECT {}, row_to_json(r)::text FROM {} r", key_sql(c), qualified(c))).await
}

/// Fill every row's invalidate key with its current value, as a reading application would.
async fn fill(db: &TestDb, redis: &TestRedis, run: &Run, c: &Case) {
    for (k, row) in model(db, c).await {
        redis.set(&format!("{}{k}", run.cache(c, "inv")), &row.to_string()).await;
    }
}

/// `key text → JSON` of every key under a prefix (JSON strings as values).
async fn cache_json(redis: &TestRedis, prefix: &str) -> Docs {
    let mut out = Docs::new();
    for k in redis.keys(&format!("{prefix}*")).await {
        if k.ends_with(":__version") {
            continue;
        }
        if let Some(v) = redis.get(&k).await {
            out.insert(k[prefix.len()..].to_string(), serde_json::from_str(&v).unwrap_or(Value::String(v)));
        }
    }
    out
}

/// `key text → {field: text}` of every hash under a prefix.
async fn cache_hashes(redis: &TestRedis, prefix: &str) -> Docs {
    let mut out = Docs::new();
    for k in redis.keys(&format!("{prefix}*")).await {
        if k.ends_with(":__version") {
            continue;
        }
        let h: BTreeMap<String, String> = redis.hgetall(&k).await.into_iter().collect();
        out.insert(k[prefix.len()..].to_string(), json!(h));
    }
    out
}

/// A row as the hash mode stores it: each non-NULL column as its text.
fn as_hash(row: &Value) -> Value {
    let mut h = serde_json::Map::new();
    for (k, v) in row.as_object().cloned().unwrap_or_default() {
        match v {
            Value::Null => {}
            Value::String(s) => {
                h.insert(k, Value::String(s));
            }
            other => {
                h.insert(k, Value::String(other.to_string()));
            }
        }
    }
    Value::Object(h)
}

/// `key text → properties` of every vertex of a case.
async fn vertices(run: &Run, c: &Case) -> Docs {
    let rows = gremlin_query(
        "g.V().hasId(startingWith(p)).project('id','props').by(id()).by(valueMap())",
        json!({ "p": run.vertex(c) }),
    )
    .await;
    let mut out = Docs::new();
    for r in rows.as_array().cloned().unwrap_or_default() {
        let id = r["id"].as_str().unwrap_or_default();
        let mut props = serde_json::Map::new();
        for (k, v) in r["props"].as_object().cloned().unwrap_or_default() {
            props.insert(k, v.get(0).cloned().unwrap_or(v));
        }
        out.insert(id.strip_prefix(&run.vertex(c)).unwrap_or(id).to_string(), Value::Object(props));
    }
    out
}

/// A row as the graph holds it: its non-NULL value columns.
fn as_vertex(row: &Value) -> Value {
    let mut p = serde_json::Map::new();
    for col in ["name", "qty", "big"] {
        if let Some(v) = row.get(col).filter(|v| !v.is_null()) {
            p.insert(col.to_string(), v.clone());
        }
    }
    Value::Object(p)
}

/// `key text → {qty, name}` of the newest point per series.
async fn newest_points(run: &Run, c: &Case) -> Docs {
    let v = influx_q(
        Some(&run.influx_db()),
        "GET",
        &format!("SELECT last(\"qty\") AS \"qty\", last(\"name\") AS \"name\" FROM \"{}\" GROUP BY \"k\"", c.name),
    )
    .await;
    let mut out = Docs::new();
    for series in v["results"][0]["series"].as_array().cloned().unwrap_or_default() {
        let key = series["tags"]["k"].as_str().unwrap_or_default().to_string();
        let cols: Vec<String> = series["columns"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|c| c.as_str().unwrap_or("").to_string())
            .collect();
        let vals = series["values"][0].as_array().cloned().unwrap_or_default();
        let mut doc = serde_json::Map::new();
        for (col, val) in cols.iter().zip(vals) {
            if col != "time" && !val.is_null() {
                doc.insert(col.clone(), val);
            }
        }
        out.insert(key, Value::Object(doc));
    }
    out
}

/// A row as its newest point holds it.
fn as_point(row: &Value) -> Value {
    let mut p = serde_json::Map::new();
    for col in ["qty", "name"] {
        if let Some(v) = row.get(col).filter(|v| !v.is_null()) {
            p.insert(col.to_string(), v.clone());
        }
    }
    Value::Object(p)
}

/// Every difference between the model and the stores, for one case.
async fn differences(db: &TestDb, redis: &TestRedis, run: &Run, c: &Case) -> Vec<String> {
    let rows = model(db, c).await;
    let case = c.name;
    let mut d = Vec::new();
    // JSON: exact, or absent only where the defined outcome says so (the last change of the
    // row did not send a column, and the table has no REPLICA IDENTITY FULL to complete it).
    let json = cache_json(redis, &run.cache(c, "json")).await;
    for (k, v) in &json {
        match rows.get(k) {
            Some(row) if row == v => {}
            Some(row) => d.push(format!("{case} cache json {k}: {v} (source {row})")),
            None => d.push(format!("{case} cache json {k}: should not exist ({v})")),
        }
    }
    if case != "c_toast" {
        for k in rows.keys().filter(|k| !json.contains_key(*k)) {
            d.push(format!("{case} cache json {k}: missing"));
        }
    }
    let hashes: Docs = rows.iter().map(|(k, v)| (k.clone(), as_hash(v))).collect();
    d.extend(diff(&format!("{case} cache hash"), &hashes, &cache_hashes(redis, &run.cache(c, "hash")).await));
    // Invalidate: absent or current.
    for (k, v) in cache_json(redis, &run.cache(c, "inv")).await {
        if rows.get(&k) != Some(&v) {
            d.push(format!("{case} cache invalidate {k}: stale value {v} (source {:?})", rows.get(&k)));
        }
    }
    d.extend(diff(&format!("{case} search"), &rows, &search_docs(&run.index(c)).await));
    let vs: Docs = rows.iter().map(|(k, v)| (k.clone(), as_vertex(v))).collect();
    d.extend(diff(&format!("{case} graph"), &vs, &vertices(run, c).await));
    // A NULL column is left out of its point (a point has no NULL fields), so the newest value
    // of each non-NULL column is compared; a row whose columns are all NULL has no point.
    let points = newest_points(run, c).await;
    for (k, row) in &rows {
        let want = as_point(row);
        let want = want.as_object().expect("object");
        if want.is_empty() {
            continue;
        }
        let ok =
            points.get(k).and_then(Value::as_object).is_some_and(|p| want.iter().all(|(f, v)| p.get(f) == Some(v)));
        if !ok {
            d.push(format!("{case} points {k}: newest {:?}, source {}", points.get(k), as_point(row)));
        }
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_case_gives_every_sink_the_state_of_the_source() {
    let _g = shared().await;
    let db = TestDb::create("conf").await;
    let run = Run { prefix: unique("conf") };
    // Indices left by an earlier run that failed before cleaning up (each restart of the test
    // OpenSearch opens every index, so leftovers slow it down).
    let (_, v) = crate::support::search::call("GET", "/_cat/indices/conf-*?format=json", None).await;
    for i in v.as_array().cloned().unwrap_or_default() {
        if let Some(name) = i["index"].as_str().filter(|n| !n.starts_with(&run.index_prefix())) {
            crate::support::search::delete_index(name).await;
        }
    }
    let cases = cases();
    db.exec(
        "CREATE SCHEMA conf_s; CREATE TYPE conf_s.mood AS ENUM ('sad', 'ok', 'meh', 'happy'); \
         CREATE DOMAIN conf_s.pos AS int CHECK (VALUE > 0)",
    )
    .await;
    for c in &cases {
        db.exec(&sql(c, &format!("CREATE TABLE {{t}} ({}, name text, qty int, big text)", c.key_ddl))).await;
        for s in c.setup {
            db.exec(&sql(c, s)).await;
        }
        for s in c.seed {
            db.exec(&sql(c, s)).await;
        }
    }
    let slot = unique("s");
    let ws = Workspace::new();
    let port = free_port();
    ws.write_config(&config(&db, &slot, &run, port));
    for c in &cases {
        pipelines(&ws, &run, c);
    }
    let redis = TestRedis::connect().await;
    for c in &cases {
        fill(&db, &redis, &run, c).await;
    }
    let log = ws.path().join("daemon.log");
    let d = ChildDaemon::spawn(&ws.config_path(), &log);
    let addr = format!("127.0.0.1:{port}");
    // Writes right after the first "ready" are never lost.
    wait_for("the first ready", WAIT, || async { http_get(&addr, "/readyz").await.is_some_and(|(s, _)| s == 200) })
        .await;
    for c in cases.iter().filter(|c| c.at_ready) {
        for s in c.statements {
            db.exec(&sql(c, s)).await;
        }
    }
    // Snapshots race updates of the rows they read.
    let stop = Arc::new(AtomicBool::new(false));
    let mut racers = Vec::new();
    for c in cases.iter().filter(|c| c.race_snapshot) {
        let (url, stop, t, k) = (db.url.clone(), Arc::clone(&stop), qualified(c), c.key[0].to_string());
        racers.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // Rows chosen by their key's hash, so every key type gets rows in every chunk;
                // paced, so the race is about order, not about load.
                let q = format!(
                    "UPDATE {t} SET qty = coalesce(qty, 0) + 1 WHERE abs(hashtext({k}::text)) % 1999 = {}",
                    (n * 7) % 1999
                );
                client.batch_execute(&q).await.unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            n
        }));
    }
    for c in cases.iter().filter(|c| !c.at_ready) {
        for s in c.statements {
            // A reader refilling the cache while a racer updates the same rows is the
            // cache-aside race itself (read old, invalidation lands, write old): those tables
            // keep the fill made before the daemon started.
            if !c.race_snapshot {
                fill(&db, &redis, &run, c).await;
            }
            db.exec(&sql(c, s)).await;
        }
    }
    let progress = || {
        polysync::checkpoint::snapshot::SnapshotProgress::load(&polysync::checkpoint::snapshot::progress_path(
            &ws.path().join("state"),
            "db",
        ))
        .unwrap_or_default()
    };
    let expected = cases.iter().filter(|c| !c.seed.is_empty()).count() * 6;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let p = progress();
        if p.tasks.len() == expected
            && p.tasks.iter().all(|t| t.state == polysync::checkpoint::snapshot::TaskState::Done)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the initial snapshots did not finish: {:#?}\nlog tail:\n{}",
            p.tasks.iter().map(|t| t.describe()).collect::<Vec<_>>(),
            d.log_text().lines().rev().take(40).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for r in racers {
        assert!(r.await.unwrap() > 0, "the racer updated rows during the snapshot");
    }
    db.wait_caught_up(&slot, WAIT).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut all = Vec::new();
        for c in &cases {
            all.extend(differences(&db, &redis, &run, c).await);
        }
        if all.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} differences, first: {:#?}\nlog tail:\n{}",
            all.len(),
            &all[..all.len().min(20)],
            d.log_text().lines().rev().take(30).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        ws.dead_letters().is_empty(),
        "no dead letters: {:#?}",
        ws.dead_letters().iter().map(|l| &l.reason).collect::<Vec<_>>()
    );
    assert!(d.terminate().await.success());
    for c in &cases {
        crate::support::search::delete_index(&run.index(c)).await;
    }
    influx_drop(&run.influx_db()).await;
    db.cleanup().await;
}
