//! Convergence checker: the source of truth against what each sink holds, every difference
//! reported by key. Rows are compared as JSON objects (`row_to_json` of the selected columns).
//!
//! Self-contained (endpoints from the same `POLYSYNC_TEST_*` variables `make peers` writes), so
//! the benchmark harness includes this file too and checks its fan-out run with it.

use std::collections::BTreeMap;

use fred::prelude::*;
use serde_json::Value;

/// key → JSON object.
pub type Docs = BTreeMap<String, Value>;

/// Rows of `SELECT <key>::text, row_to_json(…)::text …` keyed by the first column.
pub async fn pg_rows(client: &tokio_postgres::Client, sql: &str) -> Docs {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| (r.get::<_, String>(0), serde_json::from_str(&r.get::<_, String>(1)).unwrap()))
        .collect()
}

/// JSON values of every `<prefix><key>` in Redis (version keys excluded).
pub async fn redis_docs(redis: &fred::clients::Client, prefix: &str) -> Docs {
    let keys: Vec<String> = redis
        .custom(fred::types::CustomCommand::new_static("KEYS", None, false), vec![format!("{prefix}*")])
        .await
        .unwrap();
    let keys: Vec<String> = keys.into_iter().filter(|k| !k.ends_with(":__version")).collect();
    let mut out = Docs::new();
    for chunk in keys.chunks(1000) {
        let values: Vec<Option<String>> = redis.mget(chunk.to_vec()).await.unwrap();
        for (k, v) in chunk.iter().zip(values) {
            if let Some(v) = v {
                out.insert(k[prefix.len()..].to_string(), serde_json::from_str(&v).unwrap_or(Value::String(v)));
            }
        }
    }
    out
}

/// The test OpenSearch's base URL.
pub fn search_url() -> String {
    std::env::var("POLYSYNC_TEST_OPENSEARCH").unwrap_or_else(|_| "http://127.0.0.1:59200".into())
}

async fn search_call(method: reqwest::Method, path: &str, body: Option<String>) -> (u16, Value) {
    let url = format!("{}{path}", search_url().trim_end_matches('/'));
    let mut req = reqwest::Client::new().request(method, &url).header("Content-Type", "application/json");
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Every document of an index (`_id` → `_source`), paged with `search_after`.
pub async fn search_docs(index: &str) -> Docs {
    search_call(reqwest::Method::POST, &format!("/{index}/_refresh"), None).await;
    let mut out = Docs::new();
    let mut after: Option<Value> = None;
    loop {
        let mut q = serde_json::json!({"size": 5000, "sort": [{"_id": "asc"}], "query": {"match_all": {}}});
        if let Some(a) = &after {
            q["search_after"] = a.clone();
        }
        let (status, v) = search_call(reqwest::Method::POST, &format!("/{index}/_search"), Some(q.to_string())).await;
        if status == 404 {
            return out; // no index yet: no documents
        }
        assert_eq!(status, 200, "{v}");
        let hits = v["hits"]["hits"].as_array().cloned().unwrap_or_default();
        if hits.is_empty() {
            return out;
        }
        for h in &hits {
            out.insert(h["_id"].as_str().unwrap().to_string(), h["_source"].clone());
        }
        after = hits.last().map(|h| h["sort"].clone());
    }
}

/// Every difference between `expected` (the source) and `actual` (a sink), by key.
pub fn diff(what: &str, expected: &Docs, actual: &Docs) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in expected {
        match actual.get(k) {
            None => out.push(format!("{what}: key {k} missing (source has {v})")),
            Some(a) if a != v => out.push(format!("{what}: key {k} differs: source {v}, sink {a}")),
            _ => {}
        }
    }
    for k in actual.keys().filter(|k| !expected.contains_key(*k)) {
        out.push(format!("{what}: key {k} should not exist (deleted or never in the source)"));
    }
    out
}

/// Poll `fetch` until it equals `expected` (what is in flight lands, from memory or from a
/// sink's spool), or panic with the first differences after `timeout`.
pub async fn eventually_converged<F, Fut>(what: &str, expected: &Docs, timeout: std::time::Duration, mut fetch: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Docs>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let d = diff(what, expected, &fetch().await);
        if d.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} differences after {timeout:?}, first: {:#?}",
            d.len(),
            &d[..d.len().min(10)]
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Panic with the first differences when a sink has not converged.
pub fn assert_converged(what: &str, expected: &Docs, actual: &Docs) {
    let d = diff(what, expected, actual);
    assert!(d.is_empty(), "{} differences, first: {:#?}", d.len(), &d[..d.len().min(10)]);
}

/// The test Gremlin Server's WebSocket URL.
pub fn gremlin_url() -> String {
    std::env::var("POLYSYNC_TEST_GREMLIN").unwrap_or_else(|_| "ws://127.0.0.1:58182/gremlin".into())
}

/// Run a Gremlin script over the server's HTTP endpoint (same port as the WebSocket one);
/// returns `result.data`. Panics unless the server answers 200.
pub async fn gremlin_query(script: &str, bindings: Value) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = gremlin_url();
    let addr = url.trim_start_matches("ws://").split('/').next().unwrap_or_default().to_string();
    let body = serde_json::json!({ "gremlin": script, "bindings": bindings }).to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.expect("gremlin http");
    let req = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nAccept: application/vnd.gremlin-v3.0+json;types=false\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (_, payload) = text.split_once("\r\n\r\n").expect("http answer");
    let v: Value = serde_json::from_str(payload.trim()).unwrap_or_else(|e| panic!("{e}: {payload}"));
    assert_eq!(v["status"]["code"], 200, "{script}: {v}");
    v["result"]["data"].clone()
}

/// Every edge whose id starts with `prefix` (prefix stripped) → `{"from": out-vertex id, "to":
/// in-vertex id}`, from the Gremlin Server.
pub async fn graph_edges(prefix: &str) -> Docs {
    let rows = gremlin_query(
        "g.E().hasId(startingWith(p)).project('id','from','to').by(id()).by(outV().id()).by(inV().id())",
        serde_json::json!({ "p": prefix }),
    )
    .await;
    let mut out = Docs::new();
    for r in rows.as_array().cloned().unwrap_or_default() {
        let id = r["id"].as_str().unwrap_or_default();
        out.insert(
            id.strip_prefix(prefix).unwrap_or(id).to_string(),
            serde_json::json!({ "from": r["from"], "to": r["to"] }),
        );
    }
    out
}

/// The test InfluxDB's HTTP address.
pub fn influx_url() -> String {
    std::env::var("POLYSYNC_TEST_INFLUX").unwrap_or_else(|_| "http://127.0.0.1:58086".into())
}

pub async fn influx_q(db: Option<&str>, method: &str, q: &str) -> Value {
    let mut url = format!(
        "{}/query?epoch=u&q={}",
        influx_url(),
        url::form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>()
    );
    if let Some(db) = db {
        url.push_str(&format!("&db={db}"));
    }
    let req = if method == "POST" { reqwest::Client::new().post(url) } else { reqwest::Client::new().get(url) };
    req.send().await.unwrap().json().await.unwrap()
}

/// The latest value of `field` per value of `tag` in `measurement` (tag value → `{field: v}`).
pub async fn influx_last(db: &str, measurement: &str, tag: &str, field: &str) -> Docs {
    let v =
        influx_q(Some(db), "GET", &format!("SELECT last(\"{field}\") FROM \"{measurement}\" GROUP BY \"{tag}\"")).await;
    let mut out = Docs::new();
    for series in v["results"][0]["series"].as_array().cloned().unwrap_or_default() {
        let key = series["tags"][tag].as_str().unwrap_or_default().to_string();
        let last = series["values"][0][1].clone();
        let mut doc = serde_json::Map::new();
        doc.insert(field.to_string(), last);
        out.insert(key, Value::Object(doc));
    }
    out
}

/// Drop a test database.
pub async fn influx_drop(db: &str) {
    influx_q(None, "POST", &format!("DROP DATABASE \"{db}\"")).await;
}
