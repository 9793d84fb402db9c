//! Sources: where changes come from. Each produces [`crate::change::Change`]s into the
//! router under its own acknowledgement window, and confirms positions only as the window
//! allows.

pub mod dynamodb;
pub mod postgres;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::change::matcher::RelationPattern;
use crate::change::{Change, Name};
use crate::config::ConfigError;
use crate::telemetry::Health;

/// `[sources.<name>]`, by kind.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
// A handful of these exist per config, read once: boxing would only add indirection.
#[allow(clippy::large_enum_variant)]
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

/// Relation → (pipeline and where its file names the column, column) pairs the pipelines' templates and
/// column lists read.
pub type ColumnUses = BTreeMap<String, Vec<(String, String)>>;

/// Which item images DynamoDB pipelines read (a stream without them refuses to start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Images {
    /// NewImage needed.
    pub new: bool,
    /// OldImage needed.
    pub old: bool,
}

/// What the pipelines of one source need from it, gathered from the pipeline set.
#[derive(Debug, Clone, Default)]
pub struct SourceNeeds {
    /// Exact relations the pipelines name (publication set-up, table checks).
    pub tables: BTreeSet<String>,
    /// Relation → the first pipeline naming it and where ("p (pipelines/p.toml:3:15)"), so a
    /// table the database lacks is reported at the line to fix.
    pub table_sites: BTreeMap<String, String>,
    /// Columns their templates and column lists read, by relation.
    pub columns: ColumnUses,
    /// Item images their templates read (DynamoDB).
    pub images: Images,
    /// Pipelines of this source: name, relations, `snapshot = "initial"`.
    pub snapshots: Vec<(Name, Vec<RelationPattern>, bool)>,
}

/// What `polysync check --online` found for one source (or sink): what was confirmed, and
/// gaps that do not stop a start but should be fixed. An error instead is what `run` would
/// refuse with.
#[derive(Debug, Default)]
pub struct OnlineReport {
    /// What was confirmed (the writer reached, the slot, the stream, the record).
    pub facts: Vec<String>,
    /// Gaps that do not stop a start but should be fixed (failover readiness).
    pub warnings: Vec<String>,
}

/// What preparing any source needs besides its own config.
#[derive(Debug, Clone)]
pub struct SourceEnv {
    /// `[aws]` settings.
    pub aws: crate::aws::AwsSettings,
    /// The state directory (snapshot progress, checkpoint files).
    pub state_dir: PathBuf,
    /// Changes one partition may have in flight (the backpressure bound).
    pub max_in_flight: usize,
}

/// What a running source is given.
pub struct RunContext {
    /// Where its changes go.
    pub output: Arc<dyn Output>,
    /// Where what it read but cannot turn into a change goes, before it reads past it.
    pub rejects: Arc<dyn Rejects>,
    /// Readiness registry (`source <name>`).
    pub health: Arc<Health>,
    /// Stop reading, drain what was handed over, confirm it.
    pub cancel: CancellationToken,
    /// Abandon in-flight work at once (the shutdown deadline passed).
    pub hard_stop: CancellationToken,
}

/// The dead-letter queue as a source sees it: a record the source cannot decode is kept there
/// (raw, with the reason) before the source moves past it, so nothing read is dropped silently.
pub trait Rejects: Send + Sync {
    /// Keep `change` (what the source could make of the record, the raw record included) with
    /// `reason`, durably (waiting while the store cannot take it); an error means it is not
    /// kept (the daemon is stopping) and the source must not move past it.
    fn reject<'a>(&'a self, change: &'a Change, reason: &'a str) -> BoxFuture<'a, Result<(), String>>;
}

/// A checked source, ready to stream. The app drives every kind through this.
pub trait Source: Send {
    /// Source name.
    fn name(&self) -> &str;
    /// Start-up checks again, for a reload's new pipeline set.
    fn admin(&self) -> Arc<dyn SourceAdmin>;
    /// Stream until cancelled; reconnects by itself; an error means it cannot go on.
    fn run(self: Box<Self>, ctx: RunContext) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// Re-checks a running source for a new pipeline set (tables, columns, images).
pub trait SourceAdmin: Send + Sync {
    /// The checks `prepare` runs, against `needs`; refreshes what the stream reads.
    fn recheck<'a>(&'a self, needs: &'a SourceNeeds) -> BoxFuture<'a, Result<(), SourceError>>;
    /// True when this config is the one the source runs with (a reload cannot change it).
    fn same_config(&self, cfg: &SourceConfig) -> bool;
}

impl SourceConfig {
    /// Connect and run every start-up check; the prepared source streams when run.
    pub async fn prepare(
        &self,
        name: &str,
        needs: &SourceNeeds,
        env: &SourceEnv,
    ) -> Result<Box<dyn Source>, SourceError> {
        match self {
            SourceConfig::Postgres(pg) => Ok(Box::new(postgres::PostgresSource::prepare(name, pg, needs, env).await?)),
            SourceConfig::Dynamodb(d) => Ok(Box::new(dynamodb::DynamoSource::prepare(name, d, needs, env).await?)),
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

/// A source's way into the runtime, for one independently confirmed stream of changes (a
/// PostgreSQL slot, a DynamoDB shard or backfill segment). The runtime implements it; a
/// source only hands changes over and learns which of its positions may be confirmed.
///
/// Contract: a change is handed over once ([`Partition::try_send`]); a position given to
/// [`Partition::mark`] is confirmed ([`Partition::confirmed`]) only after every change handed
/// over before the mark was applied or durably recorded by every sink that takes it.
pub trait Partition: Send + Sync {
    /// Hand a change over if there is room now; otherwise it comes back.
    fn try_send(&self, change: Change) -> Result<(), SendError>;
    /// Resolves when a change like this one may fit (cancel-safe; room is not reserved).
    fn room<'a>(&'a self, change: &Change) -> BoxFuture<'a, Result<(), Closed>>;
    /// `position` may be confirmed once every change handed over so far is done.
    fn mark(&self, position: u64);
    /// The highest marked position whose changes are all done.
    fn confirmed(&self) -> u64;
    /// Changes handed over and not yet done.
    fn in_flight(&self) -> u64;
    /// True when nothing is in flight and every mark is confirmed.
    fn is_drained(&self) -> bool;
    /// The lease it is read under is no longer valid: stop, nothing more will be confirmed.
    fn is_fenced_off(&self) -> bool {
        false
    }
}

/// Opens [`Partition`]s; the runtime's router implements it.
pub trait Output: Send + Sync {
    /// A partition admitting up to `capacity` changes in flight, named for logs and metrics,
    /// starting at confirmed position `start`; read under the lease `fence` if any (its
    /// records are applied only while it is valid).
    fn partition(
        &self,
        name: &str,
        capacity: usize,
        start: u64,
        fence: Option<Arc<crate::checkpoint::fence::Fence>>,
    ) -> Arc<dyn Partition>;
}

/// [`Partition::try_send`] could not take the change.
#[derive(Debug)]
pub enum SendError {
    /// No room now: wait with [`Partition::room`] and try again (boxed: this is the slow path,
    /// and keeps the hot path's result small).
    Full(Box<Change>),
    /// The runtime is shutting down.
    Closed,
}

/// The runtime no longer takes changes (shutdown).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the pipelines are closed")]
pub struct Closed;

/// Hand `change` over, waiting for room; `Err` when the runtime closed or `stop` fired first.
pub async fn send(partition: &dyn Partition, mut change: Change, stop: &CancellationToken) -> Result<(), Closed> {
    loop {
        match partition.try_send(change) {
            Ok(()) => return Ok(()),
            Err(SendError::Closed) => return Err(Closed),
            Err(SendError::Full(c)) => {
                tokio::select! {
                    r = partition.room(&c) => r?,
                    _ = stop.cancelled() => return Err(Closed),
                    // A full window whose lease lapsed never frees up (its records are dropped,
                    // not acknowledged): give up rather than wait forever.
                    _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {
                        if partition.is_fenced_off() {
                            return Err(Closed);
                        }
                    }
                }
                change = *c;
            }
        }
    }
}
