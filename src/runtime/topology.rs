//! The running shape of the daemon: which sinks are connected and which pipeline set the lanes
//! run. Start-up and reload both go through [`Topology::plan`] (connect what is new or changed,
//! touch nothing running) and [`Topology::install`] (swap), so a reload that fails at any step
//! leaves the running set exactly as it was.
//!
//! A sink whose config changed keeps its queue: install re-points its handle at the new target
//! (see [`SinkHandle::swap`]), so nothing it holds is stranded or written to the old target, and
//! no two handles ever write one key. A sink no pipeline uses any more is retired: it finishes
//! what it holds (or dead-letters it after the deadline) and stops.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::policy::{self, Profile};
use super::queue::{Hunger, SinkQueue};
use super::sink_handle::{SinkHandle, SinkRuntime};
use super::spool::Spool;
use super::{PipelineSet, RunningPipeline};
use crate::change::Name;
use crate::pipeline::Pipeline;
use crate::sink::{Sink, SinkConfig, SinkContext, SinkError, SinkErrorKind};
use crate::telemetry::Health;

/// How hard to try when connecting a sink.
#[derive(Clone, Copy)]
pub enum Patience {
    /// Start-up: wait (with backoff) until it answers or the daemon is stopped.
    UntilStopped,
    /// Reload: one attempt with this timeout; failure keeps the old set.
    Once(Duration),
}

/// Queue and spool settings of every sink.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Lanes per sink (the pipeline lanes' count).
    pub lanes: usize,
    /// Records per lane in memory.
    pub lane_capacity: usize,
    /// A memory record older than this goes to the spool.
    pub spill_after: Duration,
    /// Spool quota per sink (0: no spool, a full lane is backpressure).
    pub spool_bytes: u64,
    /// Where spools live (`state_dir/spool`).
    pub spool_dir: PathBuf,
    /// How long a removed sink may take to finish before its records are dead-lettered.
    pub retire_deadline: Duration,
}

/// Why a plan failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A pipeline names a sink the config lacks.
    #[error("sink {0} is not defined")]
    Undefined(String),
    /// A sink could not be connected.
    #[error("{0}")]
    Sink(#[from] SinkError),
    /// A sink did not answer in time (reload).
    #[error("sink {0}: no answer within {1:?}")]
    Timeout(String, Duration),
    /// A sink's spool could not be opened.
    #[error("sink {0}: {1}")]
    Spool(String, String),
}

/// Sinks and the pipeline set.
pub struct Topology {
    /// Connected sinks by target name.
    pub sinks: BTreeMap<String, Arc<SinkHandle>>,
    /// The set lanes read.
    pub set: Arc<ArcSwap<PipelineSet>>,
    rt: SinkRuntime,
    settings: QueueSettings,
    /// Which sink queues have nothing to do (a slow sink spills only while another waits).
    hunger: Arc<Hunger>,
}

/// A prepared, not yet installed, change of the topology.
pub struct Plan {
    pipelines: Vec<Arc<Pipeline>>,
    configs: BTreeMap<String, SinkConfig>,
    start: Vec<(String, Arc<dyn Sink>, Arc<Spool>)>,
    swap: Vec<(String, Arc<dyn Sink>)>,
    retire: Vec<String>,
    /// Human summary for the log.
    pub summary: String,
}

async fn connect_sink(
    name: &str,
    cfg: &SinkConfig,
    ctx: &SinkContext,
    health: &Health,
    patience: Patience,
    stop: &CancellationToken,
) -> Result<Option<Arc<dyn Sink>>, TopologyError> {
    let mut delays = policy::backoff(Profile::Connect);
    loop {
        let attempt = match patience {
            Patience::Once(t) => match tokio::time::timeout(t, cfg.build(name, ctx)).await {
                Ok(r) => r,
                Err(_) => return Err(TopologyError::Timeout(name.to_string(), t)),
            },
            Patience::UntilStopped => tokio::select! {
                r = cfg.build(name, ctx) => r,
                _ = stop.cancelled() => return Ok(None),
            },
        };
        match attempt {
            Ok(s) => return Ok(Some(s)),
            Err(e) if e.kind == SinkErrorKind::Transient && matches!(patience, Patience::UntilStopped) => {
                let d = delays.next().unwrap_or(Duration::from_secs(10));
                health.set(&format!("sink {name}"), Err(format!("connecting: {}", e.msg)));
                tracing::warn!(sink = name, error = %e, retry_in = ?d, "sink not reachable yet; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(d) => {}
                }
            }
            Err(e) => return Err(TopologyError::Sink(e)),
        }
    }
}

impl Topology {
    /// An empty topology; lanes see an empty set until the first install.
    pub fn new(rt: SinkRuntime, settings: QueueSettings) -> Topology {
        Topology {
            sinks: BTreeMap::new(),
            set: Arc::new(ArcSwap::from_pointee(PipelineSet::new(Vec::new()))),
            rt,
            settings,
            hunger: Arc::new(Hunger::default()),
        }
    }

    /// Connect what `pipelines` need under `sinks`: unchanged sinks are kept as they are, new
    /// and changed ones are connected. Nothing running changes. `None`: stopped meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub async fn plan(
        &self,
        sinks: &BTreeMap<String, SinkConfig>,
        ctx: &SinkContext,
        pipelines: &[Arc<Pipeline>],
        health: &Health,
        patience: Patience,
        stop: &CancellationToken,
    ) -> Result<Option<Plan>, TopologyError> {
        let used: BTreeSet<String> =
            pipelines.iter().flat_map(|p| p.actions.iter().map(|a| a.target.to_string())).collect();
        let mut configs = BTreeMap::new();
        let (mut start, mut swap, mut kept) = (Vec::new(), Vec::new(), Vec::new());
        for name in &used {
            let cfg = sinks.get(name).ok_or_else(|| TopologyError::Undefined(name.clone()))?.clone();
            configs.insert(name.clone(), cfg.clone());
            match self.sinks.get(name) {
                Some(existing) if existing.config() == cfg => kept.push(name.clone()),
                existing => {
                    let Some(sink) = connect_sink(name, &cfg, ctx, health, patience, stop).await? else {
                        return Ok(None);
                    };
                    if existing.is_some() {
                        swap.push((name.clone(), sink));
                    } else {
                        let dir = self.settings.spool_dir.join(name);
                        let quota = self.settings.spool_bytes;
                        let spool = tokio::task::spawn_blocking(move || Spool::open(&dir, quota))
                            .await
                            .map_err(|e| TopologyError::Spool(name.clone(), e.to_string()))?
                            .map_err(|e| TopologyError::Spool(name.clone(), e.to_string()))?;
                        start.push((name.clone(), sink, Arc::new(spool)));
                    }
                }
            }
        }
        let retire: Vec<String> = self.sinks.keys().filter(|k| !used.contains(*k)).cloned().collect();
        let old: BTreeMap<String, u64> =
            self.set.load().pipelines().iter().map(|p| (p.def.name.to_string(), p.def.fingerprint)).collect();
        let new: BTreeMap<String, u64> = pipelines.iter().map(|p| (p.name.to_string(), p.fingerprint)).collect();
        let added: Vec<&String> = new.keys().filter(|k| !old.contains_key(*k)).collect();
        let removed: Vec<&String> = old.keys().filter(|k| !new.contains_key(*k)).collect();
        let changed: Vec<&String> =
            new.iter().filter(|(k, f)| old.get(*k).is_some_and(|o| o != *f)).map(|(k, _)| k).collect();
        let names = |v: Vec<&String>| {
            if v.is_empty() { "none".to_string() } else { v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ") }
        };
        let summary = format!(
            "pipelines: {} (added: {}; removed: {}; changed: {}); sinks: kept {}, started {}, re-pointed {}, retired {}",
            new.len(),
            names(added),
            names(removed),
            names(changed),
            names(kept.iter().collect()),
            names(start.iter().map(|s| &s.0).collect()),
            names(swap.iter().map(|s| &s.0).collect()),
            names(retire.iter().collect()),
        );
        Ok(Some(Plan { pipelines: pipelines.to_vec(), configs, start, swap, retire, summary }))
    }

    /// Swap the plan in: start new sinks, re-point changed ones, retire unused ones, and give
    /// the lanes the new pipeline set (they pick it up at their next batch).
    pub fn install(&mut self, plan: Plan) {
        for (name, sink, spool) in plan.start {
            let cfg = plan.configs[&name].clone();
            let spool = (self.settings.spool_bytes > 0).then_some(spool);
            let queue = Arc::new(SinkQueue::new(
                Name::from(name.as_str()),
                self.settings.lanes,
                self.settings.lane_capacity,
                self.settings.spill_after,
                spool,
                Arc::clone(&self.hunger),
            ));
            let handle = Arc::new(SinkHandle::start(&name, cfg, sink, queue, &self.rt));
            self.sinks.insert(name, handle);
        }
        for (name, sink) in plan.swap {
            if let Some(h) = self.sinks.get(&name) {
                tracing::info!(sink = %name, "sink config changed: its queued records go to the new target");
                h.swap(plan.configs[&name].clone(), sink);
            }
        }
        let running: Vec<RunningPipeline> = plan
            .pipelines
            .iter()
            .map(|p| RunningPipeline {
                def: Arc::clone(p),
                sinks: p.actions.iter().map(|a| Arc::clone(&self.sinks[&*a.target])).collect(),
            })
            .collect();
        self.set.store(Arc::new(PipelineSet::new(running)));
        for name in plan.retire {
            if let Some(h) = self.sinks.remove(&name) {
                tracing::info!(sink = %name, "sink no longer used: it finishes what it holds, then stops");
                let (dlq, hard) = (Arc::clone(&self.rt.dlq), self.rt.hard_stop.clone());
                self.rt.tasks.spawn(h.retire(dlq, self.settings.retire_deadline, hard));
            }
        }
    }

    /// Shutdown, after the lanes are gone: stop every sink (spools keep what is left).
    pub fn close(&mut self) {
        self.set.store(Arc::new(PipelineSet::new(Vec::new())));
        for h in self.sinks.values() {
            h.close();
        }
    }
}
