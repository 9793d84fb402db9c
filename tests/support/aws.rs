//! The moto AWS emulator (DynamoDB, DynamoDB Streams, Timestream) and wire-level stand-ins.

use std::sync::{Arc, Mutex};

pub fn endpoint() -> String {
    std::env::var("POLYSYNC_TEST_AWS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:55000".into())
}

/// The emulator's credentials must be in the environment (`make test` sources
/// `.local/peers.env`); tests cannot set them safely once threads run.
pub fn require_env() {
    for v in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"] {
        assert!(
            std::env::var(v).is_ok(),
            "{v} is not set: run the tests with `make test` (it sources .local/peers.env)"
        );
    }
}

/// SDK config for the emulator.
pub async fn sdk() -> aws_config::SdkConfig {
    require_env();
    aws_config::defaults(aws_config::BehaviorVersion::latest()).endpoint_url(endpoint()).load().await
}

/// One request a recorder saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub target: String,
    pub body: serde_json::Value,
    pub status: u16,
}

/// A wire-level recorder in front of the emulator: forwards every request unchanged and keeps
/// the AWS JSON request body and the emulator's status, so a test can see what was sent.
pub async fn recording_proxy(upstream: String) -> (String, Arc<Mutex<Vec<Seen>>>) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let client = reqwest::Client::new();
    let app = {
        let seen = Arc::clone(&seen);
        axum::Router::new().fallback(
            move |method: axum::http::Method, uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
                let (seen, client, upstream) = (Arc::clone(&seen), client.clone(), upstream.clone());
                async move {
                    let target =
                        headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                    let mut req = client.request(method, format!("{upstream}{uri}")).body(body.clone());
                    for (k, v) in &headers {
                        if k != "host" && k != "content-length" {
                            req = req.header(k, v);
                        }
                    }
                    let resp = req.send().await.unwrap();
                    let status = resp.status().as_u16();
                    let ct = resp.headers().get("content-type").cloned();
                    let out = resp.bytes().await.unwrap();
                    seen.lock().unwrap().push(Seen {
                        target,
                        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
                        status,
                    });
                    let mut h = HeaderMap::new();
                    if let Some(ct) = ct {
                        h.insert("content-type", ct);
                    }
                    (StatusCode::from_u16(status).unwrap(), h, out)
                }
            },
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), seen)
}
