//! The test OpenSearch node.

pub fn url() -> String {
    super::converge::search_url()
}

pub fn addr() -> String {
    url().trim_start_matches("http://").trim_end_matches('/').to_string()
}

/// JSON answer of a request, panicking on transport failure.
pub async fn call(method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let (status, text) =
        super::http(method, &addr(), path, body).await.unwrap_or_else(|| panic!("{method} {path}: no answer"));
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

/// `GET /index/_doc/id` → (_version, _source) if found.
pub async fn doc(index: &str, id: &str) -> Option<(i64, serde_json::Value)> {
    let (status, v) = call("GET", &format!("/{index}/_doc/{id}"), None).await;
    if status != 200 || v["found"] != true {
        return None;
    }
    Some((v["_version"].as_i64().unwrap(), v["_source"].clone()))
}

pub async fn refresh(index: &str) {
    call("POST", &format!("/{index}/_refresh"), None).await;
}

pub async fn count(index: &str) -> i64 {
    refresh(index).await;
    call("GET", &format!("/{index}/_count"), None).await.1["count"].as_i64().unwrap_or(-1)
}

/// Documents indexed into an index so far (each write counts).
pub async fn index_total(index: &str) -> i64 {
    call("GET", &format!("/{index}/_stats/indexing"), None).await.1["_all"]["primaries"]["indexing"]["index_total"]
        .as_i64()
        .unwrap_or(-1)
}

pub async fn delete_index(index: &str) {
    call("DELETE", &format!("/{index}"), None).await;
}
