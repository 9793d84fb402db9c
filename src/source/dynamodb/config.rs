//! `[sources.<name>]` with `kind = "dynamodb"`: which stream, where a new shard starts, how
//! often to poll and discover, and where checkpoints (and, for several instances, leases) live.

use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, duration_opt};

/// Where a shard without a checkpoint starts.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// The oldest record still in the stream (up to 24 h back).
    #[default]
    TrimHorizon,
    /// Only records written since the source first started (with an empty checkpoint store),
    /// for the shards open then; shards found later (children) are read from their beginning.
    Latest,
}

/// Checkpoint store choice.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(tag = "store", rename_all = "lowercase", deny_unknown_fields)]
pub enum CheckpointConfig {
    /// An embedded file (redb) in the state directory: one instance reads every shard.
    #[default]
    File,
    /// A DynamoDB lease table: several instances share the shards (KCL-style leases).
    Dynamodb {
        /// Lease table name (created if missing when `create_table = true`).
        table: String,
        /// Create the lease table (on-demand capacity) if it does not exist.
        #[serde(default)]
        create_table: bool,
        /// This instance's id (default: host name and process id).
        #[serde(default)]
        worker_id: Option<String>,
        /// A lease not renewed for this long may be taken by another instance (default 30 s).
        #[serde(default, with = "duration_opt")]
        lease_duration: Option<Duration>,
        /// Endpoint of the DynamoDB holding the lease table (default: the source's).
        #[serde(default)]
        endpoint_url: Option<String>,
    },
}

/// Settings of one DynamoDB Streams source.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DynamoSourceConfig {
    /// Table whose latest stream is read. Either this or `stream_arn`.
    #[serde(default)]
    pub table: Option<String>,
    /// Stream ARN (`arn:aws:dynamodb:…:table/<t>/stream/<label>`).
    #[serde(default)]
    pub stream_arn: Option<String>,
    /// Where a shard without a checkpoint starts (default `trim_horizon`).
    #[serde(default)]
    pub start: StartAt,
    /// Pause between GetRecords calls on an idle shard (default 1 s).
    #[serde(default, with = "duration_opt")]
    pub poll_interval: Option<Duration>,
    /// How often the shard list is refreshed (default 30 s; a finished shard refreshes it at once).
    #[serde(default, with = "duration_opt")]
    pub discovery_interval: Option<Duration>,
    /// How often a shard's confirmed position is written (default 1 s).
    #[serde(default, with = "duration_opt")]
    pub checkpoint_interval: Option<Duration>,
    /// Endpoint for DynamoDB and DynamoDB Streams of this source (default: `[aws]`).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Parallel Scan segments of a backfill (default 4).
    #[serde(default)]
    pub backfill_segments: Option<usize>,
    /// A backfill row that waited this long to be handed over is read again first (default
    /// 10 s; keep it below the sinks' tombstone memory, OpenSearch `index.gc_deletes`).
    #[serde(default, with = "duration_opt")]
    pub backfill_recheck_after: Option<Duration>,
    /// Checkpoints and leases.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Global tables: keep only the writes made in one region, told by an attribute of the
    /// item (every replica's stream carries every region's writes, and the current version of
    /// global tables marks none of them).
    #[serde(default)]
    pub only_writes_from: Option<OriginFilter>,
}

/// `only_writes_from = { attribute = "origin_region", value = "eu-west-1" }`: a record is kept
/// when its item image (the new image; for a delete, the old one) has `attribute` equal to
/// `value`, or lacks the attribute (it cannot be told apart, so it is not dropped). Legacy
/// (2017.11.29) global tables write `aws:rep:updateregion` themselves.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OriginFilter {
    /// Attribute naming the region (or any origin) of the write.
    pub attribute: String,
    /// The origin to keep.
    pub value: String,
}

impl OriginFilter {
    /// Whether a change is a write from elsewhere (dropped, and counted).
    pub fn is_foreign(&self, change: &crate::change::Change) -> bool {
        let image = match change.op {
            crate::change::Op::Delete => change.before.as_ref(),
            _ => change.after.as_ref().or(change.before.as_ref()),
        };
        match image.and_then(|row| row.get(&self.attribute)) {
            Some(crate::change::Value::Text(origin)) => *origin != self.value,
            _ => false,
        }
    }
}

impl DynamoSourceConfig {
    /// Pure validation.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let bad = |msg: String| ConfigError::Invalid { what: format!("source {name:?}"), msg };
        match (&self.table, &self.stream_arn) {
            (Some(_), Some(_)) => return Err(bad("set table or stream_arn, not both".into())),
            (None, None) => {
                return Err(bad("set table = \"<DynamoDB table>\" or stream_arn = \"arn:aws:dynamodb:…\"".into()));
            }
            (None, Some(arn)) if !arn.starts_with("arn:") || !arn.contains(":table/") || !arn.contains("/stream/") => {
                return Err(bad(format!(
                    "stream_arn {arn:?} is not a DynamoDB stream ARN (arn:aws:dynamodb:<region>:<account>:table/<table>/stream/<label>)"
                )));
            }
            (Some(t), None) if t.is_empty() => return Err(bad("table is empty".into())),
            _ => {}
        }
        if let Some(f) = &self.only_writes_from
            && (f.attribute.is_empty() || f.value.is_empty())
        {
            return Err(bad("only_writes_from needs attribute and value".into()));
        }
        if let CheckpointConfig::Dynamodb { table, lease_duration, .. } = &self.checkpoint {
            if table.is_empty() {
                return Err(bad("checkpoint table is empty".into()));
            }
            if lease_duration.is_some_and(|d| d < Duration::from_secs(3)) {
                return Err(bad("lease_duration below 3s would make leases flap".into()));
            }
        }
        Ok(())
    }

    /// The table name for `relation` (from the config, or the ARN).
    pub fn table_name(&self) -> String {
        match (&self.table, &self.stream_arn) {
            (Some(t), _) => t.clone(),
            (None, Some(arn)) => {
                arn.split(":table/").nth(1).and_then(|r| r.split('/').next()).unwrap_or_default().to_string()
            }
            (None, None) => String::new(),
        }
    }

    /// Idle poll interval.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval.unwrap_or(Duration::from_secs(1))
    }

    /// Shard discovery interval.
    pub fn discovery_interval(&self) -> Duration {
        self.discovery_interval.unwrap_or(Duration::from_secs(30))
    }

    /// Checkpoint interval.
    pub fn checkpoint_interval(&self) -> Duration {
        self.checkpoint_interval.unwrap_or(Duration::from_secs(1))
    }
}
