//! Metrics, health endpoints and logging setup.

pub mod health;
pub mod http;
pub mod metrics;
pub mod systemd;

pub use health::Health;
pub use metrics::{Metrics, metrics};

use crate::config::{LogConfig, LogFormat};

/// Install the global `tracing` subscriber. `RUST_LOG` overrides the configured level.
pub fn init_logging(cfg: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    // The file watcher's crate logs routine events at info; keep them out unless asked for.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("{},notify=error", cfg.level)));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}
