//! The test Gremlin Server (TinkerGraph), queried over its HTTP endpoint.

pub fn url() -> String {
    super::converge::gremlin_url()
}

/// Run a Gremlin script with bindings (never string-built from data); returns `result.data`
/// as untyped JSON.
pub async fn query(script: &str, bindings: serde_json::Value) -> serde_json::Value {
    super::converge::gremlin_query(script, bindings).await
}

/// Count returned by a `…count()` script.
pub async fn count(script: &str, bindings: serde_json::Value) -> i64 {
    query(script, bindings).await[0].as_i64().unwrap()
}
