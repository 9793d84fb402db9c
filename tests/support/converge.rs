//! Convergence checker: the source of truth against what each sink holds, every difference
//! reported by key. Rows are compared as JSON objects (`row_to_json` of the selected columns).

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
pub async fn redis_docs(redis: &super::redis::TestRedis, prefix: &str) -> Docs {
    let keys: Vec<String> =
        redis.keys(&format!("{prefix}*")).await.into_iter().filter(|k| !k.ends_with(":__version")).collect();
    let mut out = Docs::new();
    for chunk in keys.chunks(1000) {
        let values: Vec<Option<String>> = redis.client.mget(chunk.to_vec()).await.unwrap();
        for (k, v) in chunk.iter().zip(values) {
            if let Some(v) = v {
                out.insert(k[prefix.len()..].to_string(), serde_json::from_str(&v).unwrap_or(Value::String(v)));
            }
        }
    }
    out
}

/// Every document of an index (`_id` → `_source`), paged with `search_after`.
pub async fn search_docs(index: &str) -> Docs {
    super::search::refresh(index).await;
    let mut out = Docs::new();
    let mut after: Option<Value> = None;
    loop {
        let mut q = serde_json::json!({"size": 5000, "sort": [{"_id": "asc"}], "query": {"match_all": {}}});
        if let Some(a) = &after {
            q["search_after"] = a.clone();
        }
        let (status, v) = super::search::call("POST", &format!("/{index}/_search"), Some(&q.to_string())).await;
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

/// Panic with the first differences when a sink has not converged.
pub fn assert_converged(what: &str, expected: &Docs, actual: &Docs) {
    let d = diff(what, expected, actual);
    assert!(d.is_empty(), "{} differences, first: {:#?}", d.len(), &d[..d.len().min(10)]);
}
