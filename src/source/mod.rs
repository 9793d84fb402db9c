//! Sources: where changes come from. Each produces [`crate::change::Change`]s into the
//! router under its own acknowledgement window, and confirms positions only as the window
//! allows.

pub mod dynamodb;
pub mod postgres;

use serde::Deserialize;

use crate::config::ConfigError;

/// `[sources.<name>]`, by kind.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// PostgreSQL / Aurora PostgreSQL logical replication.
    Postgres(postgres::PostgresSourceConfig),
    /// DynamoDB Streams.
    Dynamodb(dynamodb::DynamoSourceConfig),
}

impl SourceConfig {
    /// Pure validation.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        match self {
            SourceConfig::Postgres(p) => p.validate(name).map(|_| ()),
            SourceConfig::Dynamodb(d) => d.validate(name),
        }
    }

    /// Kind word.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Postgres(_) => "postgres",
            SourceConfig::Dynamodb(_) => "dynamodb",
        }
    }
}

/// A source failure, naming the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Could not connect.
    #[error("source {source_name} ({endpoint}): {msg}")]
    Connect {
        /// Source name.
        source_name: String,
        /// Endpoint (no credentials).
        endpoint: String,
        /// What happened.
        msg: String,
        /// Whether retrying may help.
        transient: bool,
    },
    /// Start-up check failed: something is missing or misconfigured.
    #[error("source {source_name}: {msg}")]
    Setup {
        /// Source name.
        source_name: String,
        /// What is missing and how to fix it.
        msg: String,
    },
    /// The stream failed in a way reconnecting cannot fix.
    #[error("source {source_name}: {msg}")]
    Stream {
        /// Source name.
        source_name: String,
        /// What happened.
        msg: String,
    },
}
