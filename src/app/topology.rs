//! The running shape of the daemon: which sinks are connected and which pipeline set the lanes
//! run. Start-up and reload both go through [`Topology::plan`] (build what is new, reuse what is
//! unchanged, touch nothing yet) and [`Topology::install`] (swap), so a reload that fails at any
//! step leaves the running set exactly as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::AppError;
use crate::config::Config;
use crate::pipeline::{Pipeline, PipelineSet, RunningPipeline};
use crate::sink::runner::{self, LaneContext, SinkHandle};
use crate::sink::{Sink, SinkConfig, SinkContext, SinkErrorKind};
use crate::telemetry::Health;

/// How hard to try when connecting a sink.
#[derive(Clone, Copy)]
pub enum Patience {
    /// Start-up: wait (with backoff) until it answers or the daemon is stopped.
    UntilStopped,
    /// Reload: one attempt with this timeout; failure keeps the old set.
    Once(Duration),
}

/// Sinks and the pipeline set.
pub struct Topology {
    /// Connected sinks by target name.
    pub sinks: BTreeMap<String, Arc<SinkHandle>>,
    /// The set lanes read.
    pub set: Arc<ArcSwap<PipelineSet>>,
    /// Task trackers of every sink started, including retired ones, so shutdown waits for
    /// their queues to drain.
    pub trackers: Vec<TaskTracker>,
    lane_ctx: LaneContext,
    lanes: usize,
    lane_capacity: usize,
}

/// A prepared but not yet installed topology change.
pub struct Plan {
    sinks: BTreeMap<String, Arc<SinkHandle>>,
    set: PipelineSet,
    new_trackers: Vec<TaskTracker>,
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
) -> Result<Option<Arc<dyn Sink>>, AppError> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let attempt = match patience {
            Patience::Once(t) => match tokio::time::timeout(t, cfg.build(name, ctx)).await {
                Ok(r) => r,
                Err(_) => return Err(AppError::Local(format!("sink {name}: no answer within {t:?}"))),
            },
            Patience::UntilStopped => cfg.build(name, ctx).await,
        };
        match attempt {
            Ok(s) => return Ok(Some(s)),
            Err(e) if e.kind == SinkErrorKind::Transient && matches!(patience, Patience::UntilStopped) => {
                let d = delays.next().unwrap_or(Duration::from_secs(10));
                health.set(&format!("sink {name}"), Err(e.msg.clone()));
                tracing::warn!(sink = name, error = %e, retry_in = ?d, "sink not reachable yet; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(d) => {}
                }
            }
            Err(e) => return Err(AppError::Sink(e)),
        }
    }
}

impl Topology {
    /// An empty topology; lanes see an empty set until the first install.
    pub fn new(lane_ctx: LaneContext, lanes: usize, lane_capacity: usize) -> Topology {
        Topology {
            sinks: BTreeMap::new(),
            set: Arc::new(ArcSwap::from_pointee(PipelineSet::new(Vec::new()))),
            trackers: Vec::new(),
            lane_ctx,
            lanes,
            lane_capacity,
        }
    }

    /// Build what `pipelines` need under `config`: sinks whose config is unchanged are reused
    /// (keeping their connections), new or changed ones are connected. Nothing running changes.
    pub async fn plan(
        &self,
        config: &Config,
        pipelines: &[Arc<Pipeline>],
        health: &Health,
        patience: Patience,
        stop: &CancellationToken,
    ) -> Result<Option<Plan>, AppError> {
        let used: BTreeSet<String> =
            pipelines.iter().flat_map(|p| p.actions.iter().map(|a| a.target.to_string())).collect();
        let mut sinks = BTreeMap::new();
        let mut new_trackers = Vec::new();
        let (mut kept, mut started) = (Vec::new(), Vec::new());
        for name in &used {
            let cfg =
                config.sinks.get(name).ok_or_else(|| AppError::Local(format!("sink {name} is not defined")))?.clone();
            match self.sinks.get(name) {
                Some(existing) if existing.config == cfg => {
                    sinks.insert(name.clone(), Arc::clone(existing));
                    kept.push(name.clone());
                }
                _ => {
                    let ctx = SinkContext::from_config(config);
                    let Some(sink) = connect_sink(name, &cfg, &ctx, health, patience, stop).await? else {
                        return Ok(None);
                    };
                    let handle = runner::start(name, cfg, sink, self.lanes, self.lane_capacity, self.lane_ctx.clone());
                    new_trackers.push(handle.tasks.clone());
                    sinks.insert(name.clone(), Arc::new(handle));
                    started.push(name.clone());
                }
            }
        }
        let running: Vec<RunningPipeline> = pipelines
            .iter()
            .map(|p| RunningPipeline {
                def: Arc::clone(p),
                sinks: p.actions.iter().map(|a| Arc::clone(&sinks[&*a.target])).collect(),
            })
            .collect();
        let old: BTreeSet<String> = self.set.load().pipelines().iter().map(|p| p.def.name.to_string()).collect();
        let new: BTreeSet<String> = pipelines.iter().map(|p| p.name.to_string()).collect();
        let summary = format!(
            "pipelines: {} (added {:?}, removed {:?}); sinks kept {:?}, started {:?}, stopped {:?}",
            new.len(),
            new.difference(&old).collect::<Vec<_>>(),
            old.difference(&new).collect::<Vec<_>>(),
            kept,
            started,
            self.sinks.keys().filter(|k| !sinks.contains_key(*k)).collect::<Vec<_>>(),
        );
        Ok(Some(Plan { sinks, set: PipelineSet::new(running), new_trackers, summary }))
    }

    /// Swap the plan in. Lanes pick the new set up at their next batch; sinks no longer used
    /// drain what they hold and stop when the last old set referencing them is released.
    pub fn install(&mut self, plan: Plan) {
        self.trackers.extend(plan.new_trackers);
        self.sinks = plan.sinks;
        self.set.store(Arc::new(plan.set));
    }

    /// Release every sink (shutdown): lanes must already be gone.
    pub fn clear(&mut self) {
        self.set.store(Arc::new(PipelineSet::new(Vec::new())));
        self.sinks.clear();
    }
}
