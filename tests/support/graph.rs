//! The test Gremlin Server (TinkerGraph), queried over its HTTP endpoint.

pub fn url() -> String {
    std::env::var("POLYSYNC_TEST_GREMLIN").unwrap_or_else(|_| "ws://127.0.0.1:58182/gremlin".into())
}

fn http_addr() -> String {
    url().trim_start_matches("ws://").split('/').next().unwrap().to_string()
}

/// Run a Gremlin script with bindings (never string-built from data); returns `result.data`
/// as untyped JSON.
pub async fn query(script: &str, bindings: serde_json::Value) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = http_addr();
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
    let v: serde_json::Value = serde_json::from_str(payload.trim()).unwrap_or_else(|e| panic!("{e}: {payload}"));
    assert_eq!(v["status"]["code"], 200, "{script}: {v}");
    v["result"]["data"].clone()
}

/// Count returned by a `…count()` script.
pub async fn count(script: &str, bindings: serde_json::Value) -> i64 {
    query(script, bindings).await[0].as_i64().unwrap()
}
