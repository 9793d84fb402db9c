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
    /// Keep dead letters in S3 (`[dlq.s3]`): the durable record, so they outlive the machine
    /// (a Fargate task's disk). The local files become a buffer drained to S3.
    pub s3: Option<S3DlqConfig>,
}

/// `[dlq.s3]`: the bucket and prefix dead letters are written to, one object per entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct S3DlqConfig {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix (default `polysync/`); entries are `<prefix><pipeline>/<sink>/<date>/<id>.json`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Server-side encryption: `AES256` (S3-managed keys, the default) or `aws:kms`.
    #[serde(default)]
    pub sse: Sse,
    /// KMS key for `sse = "aws:kms"` (default: the account's S3 key).
    #[serde(default)]
    pub kms_key_id: Option<String>,
    /// Endpoint (default: `[aws] endpoint_url`, else S3's).
    #[serde(default)]
    pub endpoint_url: Option<String>,
}

/// Server-side encryption of dead-letter objects.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum Sse {
    /// S3-managed keys.
    #[default]
    #[serde(rename = "AES256")]
    Aes256,
    /// KMS keys (`kms_key_id`, or the account's default).
    #[serde(rename = "aws:kms")]
    Kms,
}

fn default_prefix() -> String {
    "polysync/".into()
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
            s3: None,
        }
    }
}
