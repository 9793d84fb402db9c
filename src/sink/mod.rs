//! Sinks: the derived stores polysync keeps in step.
//!
//! A sink kind contributes three things: its target config (`[sinks.<name>]`), the *action* a
//! pipeline configures for it (`[[sink]]` in a pipeline file, compiled into an [`Action`] that
//! turns a change into [`Payload`]s on the pipeline lanes), and the [`Sink`] that writes batches
//! of payloads. The runtime owns queueing, batching, retries, dead-lettering and
//! acknowledgement, so each sink only has to say what happened to each item.

pub mod cache;
pub mod graph;
pub mod noop;
pub mod search;
pub mod timeseries;
pub mod version;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;

use crate::change::template::{Path, Scope};
use crate::change::{Change, Name};
use crate::config::ConfigError;

/// `[sinks.<name>]`: one target, by kind.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// Redis / ElastiCache / Valkey.
    Cache(cache::CacheSinkConfig),
    /// OpenSearch Service / Serverless.
    Search(search::SearchSinkConfig),
    /// Neptune / Gremlin Server.
    Graph(graph::GraphSinkConfig),
    /// Timestream for LiveAnalytics or InfluxDB.
    Timeseries(timeseries::TimeseriesSinkConfig),
    /// Accepts and discards (benchmarks, dry runs).
    Noop(noop::NoopSinkConfig),
}

/// What building a sink needs besides its own config.
#[derive(Debug, Clone, Default)]
pub struct SinkContext {
    /// `[aws]` settings.
    pub aws: crate::aws::AwsSettings,
    /// Directory of the config file (relative paths in sink configs start there).
    pub base_dir: std::path::PathBuf,
    /// `check --online`: connect and check, but create nothing (databases, indices).
    pub dry_run: bool,
}

/// Read a `[[sink]]` table into an action's raw form. An error names the key it is about
/// (`` `key`: invalid type: … ``) so the pipeline loader can point at that key's line, and
/// says what was expected where serde's words do not.
pub fn parse_action<T: serde::de::DeserializeOwned>(table: toml::Table) -> Result<T, String> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().message().trim().to_string();
        let hint = if msg.starts_with("invalid type: sequence, expected a string") && path == "key" {
            " (`key` takes one template; several cache keys go in `keys = [...]`)"
        } else if msg.starts_with("invalid type: string") && msg.contains("expected a sequence") {
            " (this key takes a list: `[\"...\"]`)"
        } else {
            ""
        };
        if path.is_empty() || path == "." { format!("{msg}{hint}") } else { format!("`{path}`: {msg}{hint}") }
    })
}

impl SinkConfig {
    /// Kind word.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Cache(_) => "cache",
            SinkConfig::Search(_) => "search",
            SinkConfig::Graph(_) => "graph",
            SinkConfig::Timeseries(_) => "timeseries",
            SinkConfig::Noop(_) => "noop",
        }
    }

    /// Pure validation.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        match self {
            SinkConfig::Cache(c) => c.validate(name),
            SinkConfig::Search(c) => c.validate(name),
            SinkConfig::Graph(c) => c.validate(name),
            SinkConfig::Timeseries(c) => c.validate(name),
            SinkConfig::Noop(_) => Ok(()),
        }
    }

    /// Compile a pipeline's `[[sink]]` table for this target.
    pub fn compile_action(&self, target: &str, table: toml::Table) -> Result<Arc<dyn Action>, String> {
        match self {
            SinkConfig::Cache(c) => cache::action::compile(c, target, table),
            SinkConfig::Search(c) => {
                search::action::compile(table, c.max_document_bytes.map(|b| b.0 as usize).unwrap_or(10 << 20))
            }
            SinkConfig::Graph(_) => graph::action::compile(table),
            SinkConfig::Timeseries(_) => timeseries::action::compile(table),
            SinkConfig::Noop(_) => noop::compile(table),
        }
    }

    /// Connect and return the running sink.
    pub async fn build(&self, name: &str, ctx: &SinkContext) -> Result<Arc<dyn Sink>, SinkError> {
        match self {
            SinkConfig::Cache(c) => Ok(Arc::new(cache::CacheSink::connect(name, c).await?)),
            SinkConfig::Search(c) => {
                Ok(Arc::new(search::SearchSink::connect(name, c, &ctx.aws, &ctx.base_dir, ctx.dry_run).await?))
            }
            SinkConfig::Graph(c) => Ok(Arc::new(graph::GraphSink::connect(name, c, &ctx.aws, &ctx.base_dir).await?)),
            SinkConfig::Timeseries(c) => match c.engine {
                timeseries::Engine::Timestream => {
                    Ok(Arc::new(timeseries::timestream::TimestreamSink::connect(name, c, &ctx.aws, ctx.dry_run).await?))
                }
                timeseries::Engine::Influxdb => {
                    Ok(Arc::new(timeseries::influx::InfluxSink::connect(name, c, &ctx.base_dir, ctx.dry_run).await?))
                }
            },
            SinkConfig::Noop(c) => Ok(Arc::new(noop::NoopSink::new(name, c))),
        }
    }
}

/// What a pipeline action produced for one sink (serialisable: a spooled record holds it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Payload {
    /// Cache operation.
    Cache(cache::CacheOp),
    /// Search index/delete.
    Search(search::SearchOp),
    /// Remove every document of an index (a truncate).
    SearchClear {
        /// The index.
        index: String,
    },
    /// Graph writes of one change.
    Graph(Vec<graph::GraphOp>),
    /// Time-series points of one change.
    Points(Vec<timeseries::Point>),
    /// Nothing to write (noop sink).
    Discard,
}

/// One unit of work for a sink.
#[derive(Debug)]
pub struct Record {
    /// The change it came from (for the DLQ and lag metrics).
    pub change: Arc<Change>,
    /// Pipeline that produced it.
    pub pipeline: Name,
    /// What to write.
    pub payload: Payload,
}

/// What happened to one item of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Durably applied (or already superseded by a newer version: also success).
    Applied,
    /// Permanently refused; goes to the DLQ with this reason.
    Rejected(String),
    /// Temporarily refused; retried alone with backoff.
    Retry(String),
}

/// Whether a whole-request failure may heal by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkErrorKind {
    /// Network, timeout, server busy or restarting: retry with backoff.
    Transient,
    /// Configuration or permission problem: needs a person (start-up refuses; at run time it
    /// is retried with backoff and reported unready, since dropping data is never an option).
    Fatal,
}

/// A sink-level failure, naming the sink and its endpoint.
#[derive(Debug, Clone, thiserror::Error)]
#[error("sink {sink} ({endpoint}): {msg}")]
pub struct SinkError {
    /// Target name.
    pub sink: String,
    /// Where it points (no credentials).
    pub endpoint: String,
    /// Retry policy class.
    pub kind: SinkErrorKind,
    /// What happened.
    pub msg: String,
}

/// Batch bounds for a sink.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most records per request.
    pub max_records: usize,
    /// How long to wait for more records once one is there (0 = send what is queued).
    pub linger: Duration,
}

/// A running sink.
///
/// Contract: delivery is at-least-once; `write` must be idempotent or version-guarded, because
/// a batch may be written again after a crash or a retry. Calls for different lanes may run
/// concurrently; within a lane calls are sequential and in order. `write` returns one outcome
/// per record, in order, and only once each `Applied` item is durable in the sink. An `Err`
/// means nothing can be said about any item, and the whole batch is retried.
pub trait Sink: Send + Sync + 'static {
    /// Target name.
    fn name(&self) -> &str;
    /// Endpoint for messages (no credentials).
    fn endpoint(&self) -> String;
    /// Batch bounds.
    fn limits(&self) -> BatchLimits;
    /// Write a batch.
    fn write<'a>(&'a self, batch: &'a [Arc<Record>]) -> BoxFuture<'a, Result<Vec<ItemOutcome>, SinkError>>;
    /// Cheap reachability check for readiness.
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>>;
}

/// A compiled pipeline action: change → payloads for one sink.
pub trait Action: Send + Sync {
    /// Render the payloads of one change (appending to `out`). An error sends the change to
    /// the DLQ for this sink with the message as reason.
    fn render(&self, scope: &dyn Scope, change: &Change, out: &mut Vec<Payload>) -> Result<(), String>;
    /// Template paths the action reads (checked against table columns at start-up).
    fn paths(&self) -> Vec<&Path>;
    /// Columns a `columns = [...]` list names (checked against table columns at start-up, so a
    /// typo is refused rather than silently leaving a field out).
    fn columns(&self) -> Vec<&str> {
        Vec::new()
    }
    /// One line for `polysync check`'s plan.
    fn describe(&self) -> String;
}
