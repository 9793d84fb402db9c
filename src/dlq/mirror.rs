//! Optional copy of dead letters into a Redis stream (`XADD … MAXLEN ~ n`), so other systems
//! can consume or alert on them. Best effort by design: the JSONL files are written (and
//! fsynced) first and remain what `dlq replay` reads; a full or failing mirror is counted in
//! `polysync_dlq_mirror_dropped_total` and logged, never blocks delivery.

use fred::prelude::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::DlqConfig;
use crate::config::redact_url;

/// Start the mirror task if configured; returns the sender the DLQ writes into.
pub async fn start(
    cfg: &DlqConfig,
    cancel: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<Option<mpsc::Sender<String>>, String> {
    let Some(url) = &cfg.redis_url else { return Ok(None) };
    let endpoint = redact_url(url.expose());
    let config = Config::from_url(url.expose()).map_err(|e| format!("dlq.redis_url {endpoint}: {e}"))?;
    let client = Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .build()
        .map_err(|e| format!("dlq.redis_url {endpoint}: {e}"))?;
    client.init().await.map_err(|e| format!("dlq.redis_url {endpoint}: {e}"))?;
    let (tx, mut rx) = mpsc::channel::<String>(10_000);
    let stream = cfg.redis_stream.clone();
    let maxlen = cfg.redis_maxlen;
    tasks.spawn(async move {
        loop {
            let line = tokio::select! {
                _ = cancel.cancelled() => break,
                l = rx.recv() => match l { Some(l) => l, None => break },
            };
            let r: Result<String, _> = client
                .xadd(&stream, false, ("MAXLEN", "~", maxlen as i64), "*", vec![("entry", line.trim_end())])
                .await;
            if let Err(e) = r {
                crate::telemetry::metrics().dlq_mirror_dropped.inc();
                tracing::warn!(error = %e, stream = %stream, "could not copy a dead letter to the Redis stream (the DLQ file has it)");
            }
        }
        let _ = client.quit().await;
    });
    Ok(Some(tx))
}
