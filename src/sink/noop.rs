//! The `noop` sink: accepts everything and writes nothing. It measures the daemon without a
//! store (the benchmark's "polysync to a no-op sink") and lets a pipeline be dry-run.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;

use super::{Action, BatchLimits, ItemOutcome, Payload, Record, Sink, SinkError};
use crate::change::Change;
use crate::change::template::{Path, Scope};

/// `[sinks.<name>]` with `kind = "noop"`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct NoopSinkConfig {
    /// Most records per batch (default 1024).
    #[serde(default)]
    pub batch_size: Option<usize>,
}

/// The sink.
pub struct NoopSink {
    name: String,
    limits: BatchLimits,
}

impl NoopSink {
    /// New sink.
    pub fn new(name: &str, cfg: &NoopSinkConfig) -> NoopSink {
        NoopSink {
            name: name.to_string(),
            limits: BatchLimits { max_records: cfg.batch_size.unwrap_or(1024), linger: Duration::ZERO },
        }
    }
}

impl Sink for NoopSink {
    fn name(&self) -> &str {
        &self.name
    }
    fn endpoint(&self) -> String {
        "noop".into()
    }
    fn limits(&self) -> BatchLimits {
        self.limits
    }
    fn write<'a>(&'a self, batch: &'a [Arc<Record>]) -> BoxFuture<'a, Result<Vec<ItemOutcome>, SinkError>> {
        Box::pin(async move { Ok(vec![ItemOutcome::Applied; batch.len()]) })
    }
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}

struct Discard;

impl Action for Discard {
    fn render(&self, _: &dyn Scope, _: &Change, out: &mut Vec<Payload>) -> Result<(), String> {
        out.push(Payload::Discard);
        Ok(())
    }
    fn paths(&self) -> Vec<&Path> {
        Vec::new()
    }
    fn describe(&self) -> String {
        "discard".into()
    }
}

/// Compile a `[[sink]]` table for a noop target (only `target` is allowed).
pub fn compile(table: toml::Table) -> Result<Arc<dyn Action>, String> {
    if let Some(k) = table.keys().find(|k| *k != "target") {
        return Err(format!("noop sink takes no options (found {k:?})"));
    }
    Ok(Arc::new(Discard))
}
