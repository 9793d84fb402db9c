//! The runtime: everything between a source handing over a change and a sink acknowledging
//! it, in one place.
//!
//! ```text
//! source ─► router ─► pipeline lane[hash(table, key)] ─► sink queue (memory │ spool) ─► writers
//!   ▲         │ window (tickets)                                │
//!   └─ confirm ◄──── lowest change not yet applied or spooled by every sink ◄──┘
//! ```
//!
//! * [`router`] admits a change when its partition's window ([`window`]) and its lane have room;
//!   a truncate becomes a barrier across all lanes.
//! * [`lane`] runs the pipelines and pushes their records into each sink's [`queue`].
//! * Each sink consumes at its own pace: its [`queue`] holds records in memory while it keeps
//!   up and in its [`spool`] while it is behind, so a slow or broken sink neither slows the
//!   others nor pins the source beyond its spool's quota. Its [`writer`]s apply batches.
//! * [`policy`] decides retry, dead-letter or stop for every failure, and reports it.
//! * [`topology`] builds and swaps the set of sinks and pipelines at start and on reload.

pub mod lane;
pub mod policy;
pub mod queue;
pub mod record;
pub mod router;
pub mod sink_handle;
pub mod spool;
pub mod spool_drain;
#[cfg(test)]
mod tests;
pub mod topology;
pub mod window;
pub mod writer;

use std::sync::Arc;

use crate::pipeline::Pipeline;
use sink_handle::SinkHandle;

/// A pipeline with the running sinks its actions write to.
pub struct RunningPipeline {
    /// The definition.
    pub def: Arc<Pipeline>,
    /// One handle per action, same order.
    pub sinks: Vec<Arc<SinkHandle>>,
}

/// The set of pipelines lanes run; swapped whole on reload.
pub struct PipelineSet {
    pipelines: Vec<RunningPipeline>,
}

impl PipelineSet {
    /// A set from running pipelines.
    pub fn new(pipelines: Vec<RunningPipeline>) -> PipelineSet {
        PipelineSet { pipelines }
    }

    /// Pipelines in the set.
    pub fn pipelines(&self) -> &[RunningPipeline] {
        &self.pipelines
    }

    /// Indexes of pipelines matching (source, relation). Lanes cache the answer per relation.
    pub fn matching(&self, source: &str, relation: &str) -> Vec<usize> {
        self.pipelines
            .iter()
            .enumerate()
            .filter(|(_, p)| &*p.def.source == source && p.def.matches_relation(relation))
            .map(|(i, _)| i)
            .collect()
    }

    /// Pipeline by index (from [`PipelineSet::matching`]).
    pub fn get(&self, i: usize) -> &RunningPipeline {
        &self.pipelines[i]
    }
}
