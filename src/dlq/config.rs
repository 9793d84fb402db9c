//! `[dlq]`: where dead letters go and how much room they may take.

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{ByteSize, Secret};

/// Dead-letter queue settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// Directory of the JSONL files (relative to `state_dir`).
    pub dir: PathBuf,
    /// Rotate the active file at this size.
    pub max_file_bytes: ByteSize,
    /// Total size of all DLQ files; when reached, the affected pipeline stops and says so.
    pub max_total_bytes: ByteSize,
    /// Also copy every entry to a Redis stream (for consumers and alerting); the files stay
    /// the record `dlq replay` works from.
    pub redis_url: Option<Secret>,
    /// Stream key for the copy.
    pub redis_stream: String,
    /// Approximate cap on the stream's length (XADD MAXLEN ~).
    pub redis_maxlen: u64,
}

impl Default for DlqConfig {
    fn default() -> Self {
        DlqConfig {
            dir: PathBuf::from("dlq"),
            max_file_bytes: ByteSize(64 << 20),
            max_total_bytes: ByteSize(1 << 30),
            redis_url: None,
            redis_stream: "polysync:dlq".into(),
            redis_maxlen: 100_000,
        }
    }
}
