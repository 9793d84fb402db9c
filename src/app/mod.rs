//! Wiring: config → sinks → pipelines → lanes → sources, live reload, and the orderly way back
//! down. Every task the daemon starts is on one tracker the [`daemon`] owns; signals are
//! handled in `main`, which hands them in as [`Controls`].
//!
//! Shutdown order matters for the delivery guarantee: sources stop reading first and wait
//! until everything they handed out is applied or spooled (or the deadline passes), then
//! confirm; only then are lanes and sinks closed. Work abandoned at the deadline is never
//! acknowledged, so it replays on the next start, and the run reports itself unclean.

pub mod config;
pub mod daemon;
pub mod dlq_replay;
pub mod dlq_store;
pub mod needs;
pub mod reload;
pub mod snapshot_request;
pub mod status;
pub mod warnings;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::pipeline::{Pipeline, load};
use crate::runtime::topology::TopologyError;
use crate::source::SourceError;
pub use config::Config;

pub use daemon::run;
pub use needs::source_needs;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Invalid config or pipelines.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A source refused to start or failed for good.
    #[error("{0}")]
    Source(#[from] SourceError),
    /// A sink could not be set up.
    #[error("{0}")]
    Topology(#[from] TopologyError),
    /// Local state (DLQ, state dir, spool, listener).
    #[error("{0}")]
    Local(String),
}

/// What `main` hands the daemon: its signals, as tokens and a channel.
pub struct Controls {
    /// Stop reading and drain (first SIGTERM/SIGINT).
    pub stop: CancellationToken,
    /// Abandon in-flight work at once (a second SIGTERM/SIGINT).
    pub abandon: CancellationToken,
    /// Reload requests (SIGHUP).
    pub reload: mpsc::Receiver<()>,
}

/// The other ends of [`Controls`], for whoever delivers the signals.
pub struct ControlHandles {
    /// Cancel to stop.
    pub stop: CancellationToken,
    /// Cancel to abandon in-flight work.
    pub abandon: CancellationToken,
    /// Send to reload.
    pub reload: mpsc::Sender<()>,
}

impl Controls {
    /// A pair: the daemon's controls and the handles that drive them.
    pub fn new() -> (Controls, ControlHandles) {
        let (tx, rx) = mpsc::channel(1);
        let (stop, abandon) = (CancellationToken::new(), CancellationToken::new());
        (
            Controls { stop: stop.clone(), abandon: abandon.clone(), reload: rx },
            ControlHandles { stop, abandon, reload: tx },
        )
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// False when in-flight changes were abandoned at the deadline (they replay on the next
    /// start); `main` exits non-zero then.
    pub clean: bool,
}

/// Load config and pipelines exactly as `run` does, without touching the network.
pub fn check(config: &Config) -> Result<Vec<Arc<Pipeline>>, ConfigError> {
    load::load_all(&config.pipeline_env())
}

/// What `check --online` found for one source or sink (`source shop`, `sink cache`): facts and
/// warnings, or what `run` would refuse with.
pub type OnlineCheck = (String, Result<crate::source::OnlineReport, String>);

/// `check --online`: the read-only part of every start-up check against the real servers.
/// PostgreSQL sources: the writer, the privileges, tables, publication, keys, replica identity
/// and the columns the pipelines name, the slot against polysync's record, failover readiness.
/// Sinks the pipelines use: connected and checked as at start (reachable, authenticated, the
/// InfluxDB database present), without creating anything. DynamoDB sources: the table, its
/// stream and view type, the shards and the checkpoint file or lease table.
pub async fn check_online(config: &Config, pipelines: &[Arc<Pipeline>]) -> Vec<OnlineCheck> {
    let mut out = Vec::new();
    for (name, source) in &config.sources {
        let label = format!("source {name}");
        match source {
            crate::source::SourceConfig::Postgres(pg) => {
                let needs = needs::source_needs(pipelines, name);
                let r = crate::source::postgres::check_online(name, pg, &needs, &config.state_dir).await;
                // The error names the source already; the label does too.
                let prefix = format!("{label}: ");
                out.push((label, r.map_err(|e| e.to_string().trim_start_matches(&prefix).to_string())));
            }
            crate::source::SourceConfig::Dynamodb(ddb) => {
                let needs = needs::source_needs(pipelines, name);
                let r = crate::source::dynamodb::check_online(name, ddb, &needs, &config.source_env()).await;
                let prefix = format!("{label}: ");
                out.push((label, r.map_err(|e| e.to_string().trim_start_matches(&prefix).to_string())));
            }
        }
    }
    let used: std::collections::BTreeSet<&str> =
        pipelines.iter().flat_map(|p| p.actions.iter().map(|a| &*a.target)).collect();
    let ctx = crate::sink::SinkContext { dry_run: true, ..config.sink_context() };
    for (name, sink) in config.sinks.iter().filter(|(n, _)| used.contains(n.as_str())) {
        let label = format!("sink {name}");
        let built = tokio::time::timeout(std::time::Duration::from_secs(20), sink.build(name, &ctx)).await;
        let r = match built {
            Ok(Ok(s)) => Ok(crate::source::OnlineReport {
                facts: vec![format!("{} answers and accepts the credentials", s.endpoint())],
                warnings: Vec::new(),
            }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within 20 s from {name}")),
        };
        out.push((label, r));
    }
    out
}
