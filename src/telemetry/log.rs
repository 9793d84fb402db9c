//! Logging: the `[log]` settings and the subscriber they install.

use serde::Deserialize;

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `polysync=debug`.
    pub level: String,
    /// Colour codes in text lines: `auto` (default: only when stderr is a terminal, so files,
    /// journald and CloudWatch get plain text), `always` or `never`.
    pub color: LogColor,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into(), color: LogColor::Auto }
    }
}

/// When text log lines carry ANSI colour codes.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogColor {
    /// Only on a terminal.
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

impl LogColor {
    /// Whether to colour, given whether stderr is a terminal.
    pub fn enabled(self, terminal: bool) -> bool {
        match self {
            LogColor::Auto => terminal,
            LogColor::Always => true,
            LogColor::Never => false,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line (for CloudWatch / Loki).
    Json,
}

/// Install the global `tracing` subscriber. `RUST_LOG` overrides the configured level.
pub fn init_logging(cfg: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    // The file watcher's crate logs routine events at info; keep them out unless asked for.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("{},notify=error", cfg.level)));
    use std::io::IsTerminal;
    let ansi = cfg.color.enabled(std::io::stderr().is_terminal());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}
