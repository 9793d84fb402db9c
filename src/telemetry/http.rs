//! The HTTP listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`, and `/status`
//! (JSON: each component's state and last error, the last reload) for `polysync status`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::health::Health;
use super::metrics::metrics;

/// Liveness fails when the event loop has not ticked for this long.
const STALL: Duration = Duration::from_secs(10);

/// Bind the listener (so a port clash fails start-up) and serve until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/metrics", get(|| async { metrics().render() }))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(|State(h): State<Arc<Health>>| async move { axum::Json(h.status()) }))
        .with_state(Arc::clone(&health));
    let ticker = {
        let health = Arc::clone(&health);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = t.tick() => health.beat(),
                }
            }
        })
    };
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await;
        ticker.abort();
    }))
}

async fn healthz(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    let since = h.since_beat();
    if since > STALL {
        (StatusCode::SERVICE_UNAVAILABLE, format!("event loop stalled for {since:?}\n"))
    } else {
        (StatusCode::OK, "ok\n".into())
    }
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    match h.readiness() {
        Ok(body) => (StatusCode::OK, body + "\n"),
        Err(body) => (StatusCode::SERVICE_UNAVAILABLE, body + "\n"),
    }
}

/// A minimal HTTP/1.1 GET for `polysync healthcheck` (container images have no curl):
/// returns the status code and body.
pub async fn probe(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("{addr}: {e}"))?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        s.take(1 << 20).read_to_end(&mut buf).await.map_err(|e| format!("{addr}: {e}"))?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fetch).await.map_err(|_| format!("{addr}: no answer within {timeout:?}"))?
}
