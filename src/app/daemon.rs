//! One run of the daemon, start to finish. The [`Daemon`] value owns every task (one tracker)
//! and the tokens that stop them, so nothing outlives it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::reload::{Reloader, Trigger};
use super::{AppError, Controls, Stopped, source_needs};
use crate::app::Config;
use crate::dlq::DeadLetterQueue;
use crate::pipeline::load;
use crate::retry::{Profile, backoff};
use crate::runtime::lane::{self, LaneInputs};
use crate::runtime::router::Router;
use crate::runtime::sink_handle::SinkRuntime;
use crate::runtime::topology::{Patience, QueueSettings, Topology};
use crate::source::{Output, RunContext, Source, SourceAdmin, SourceError};
use crate::telemetry::systemd::Notifier;
use crate::telemetry::{Health, metrics};

/// The tasks and tokens of one run.
pub struct Daemon {
    /// Every task of the run.
    pub tasks: TaskTracker,
    /// Stops helpers (watchdog, readiness notice, file watch) once shutdown begins.
    pub background: CancellationToken,
    /// Stops sources reading (they drain and confirm).
    pub cancel: CancellationToken,
    /// Abandons in-flight work (the deadline passed, or a second signal).
    pub hard_stop: CancellationToken,
}

impl Daemon {
    fn new() -> Daemon {
        Daemon {
            tasks: TaskTracker::new(),
            background: CancellationToken::new(),
            cancel: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        }
    }
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Records a source cannot decode go to the dead-letter queue under pipeline `-` and sink
/// `-`: before any pipeline, so replay keeps them for a person rather than guessing.
struct SourceRejects {
    dlq: Arc<DeadLetterQueue>,
    hard_stop: CancellationToken,
}

impl crate::source::Rejects for SourceRejects {
    fn reject<'a>(
        &'a self,
        change: &'a crate::change::Change,
        reason: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let entry = crate::dlq::DeadLetter { pipeline: "-", sink: "-", reason, change };
            if crate::runtime::writer::keep_dead_letter(&self.dlq, &entry, &self.hard_stop).await {
                Ok(())
            } else {
                Err("the daemon is stopping before the record was kept".into())
            }
        })
    }
}

/// Connect and check a source, waiting out an unreachable database or stream; anything that
/// needs a person (auth, TLS, missing objects) is returned as an error.
async fn prepare_source(
    name: &str,
    config: &Config,
    pipelines: &[Arc<crate::pipeline::Pipeline>],
    health: &Health,
    stop: &CancellationToken,
) -> Result<Option<Box<dyn Source>>, AppError> {
    let cfg = &config.sources[name];
    let needs = source_needs(pipelines, name);
    let env = config.source_env();
    let mut delays = backoff(Profile::Connect);
    loop {
        let attempt = tokio::select! {
            r = cfg.prepare(name, &needs, &env) => r,
            _ = stop.cancelled() => return Ok(None),
        };
        match attempt {
            Ok(src) => return Ok(Some(src)),
            Err(SourceError::Connect { transient: true, ref msg, .. }) => {
                let d = delays.next().unwrap_or(Duration::from_secs(10));
                health.set(&format!("source {name}"), Err(format!("connecting: {msg}")));
                tracing::warn!(source = %name, error = %msg, retry_in = ?d, "source not reachable yet; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(d) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Run the daemon until `controls.stop` (or a fatal source error), then shut down in order.
pub async fn run(config: Config, mut controls: Controls) -> Result<Stopped, AppError> {
    let d = Daemon::new();
    let notifier = Notifier::from_env();
    let (reload_tx, mut reload_rx) = mpsc::channel::<Trigger>(1);
    {
        // SIGHUP (from main) and file edits both become reload triggers.
        let (tx, stop) = (reload_tx.clone(), d.background.clone());
        d.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = controls.reload.recv() => match r {
                        Some(()) => { let _ = tx.try_send(Trigger::Signal); }
                        None => return,
                    },
                }
            }
        });
    }
    // Watch files from the start: an edit made while sources connect (slot creation can take
    // seconds) is queued and served once running, never missed.
    let _watcher = if config.reload.watch {
        match super::reload::watch(
            &config.path,
            &config.pipelines_dir,
            reload_tx.clone(),
            d.background.clone(),
            &d.tasks,
        ) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch config files; reload with SIGHUP only");
                None
            }
        }
    } else {
        None
    };
    let stop = controls.stop.clone();
    {
        // A second signal (or the caller) abandons in-flight work.
        let (abandon, hard) = (controls.abandon.clone(), d.hard_stop.clone());
        d.tasks.spawn(async move {
            tokio::select! {
                _ = abandon.cancelled() => hard.cancel(),
                _ = hard.cancelled() => {}
            }
        });
    }
    let pipelines = load::load_all(&config.pipeline_env())?;
    for w in
        super::warnings::plaintext_warnings(&config).into_iter().chain(super::warnings::lease_margin_warnings(&config))
    {
        tracing::warn!("{w}");
    }
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| AppError::Local(format!("state_dir {}: {e}", config.state_dir.display())))?;
    let mut dlq = DeadLetterQueue::open(&config.dlq_dir(), config.dlq.max_file_bytes.0, config.dlq.max_total_bytes.0)
        .map_err(|e| AppError::Local(e.to_string()))?;
    if let Some(tx) =
        crate::dlq::mirror::start(&config.dlq, d.background.clone(), &d.tasks).await.map_err(AppError::Local)?
    {
        dlq.set_mirror(tx);
    }
    if let Some(s3) = &config.dlq.s3 {
        dlq.set_durable(Arc::new(super::dlq_store::connect(s3, &config.aws).await.map_err(AppError::Local)?));
    }
    let dlq = Arc::new(dlq);
    if dlq.durable().is_some() {
        d.tasks.spawn(super::dlq_store::drain_earlier(Arc::clone(&dlq), d.background.clone()));
    }
    metrics().dlq_bytes.set(dlq.total_bytes() as i64);
    let health = Arc::new(Health::new());
    let http_stop = CancellationToken::new();
    let http = match config.metrics.enabled.then_some(config.metrics.listen) {
        Some(addr) => Some(
            crate::telemetry::http::serve(addr, Arc::clone(&health), http_stop.clone())
                .await
                .map_err(|e| AppError::Local(format!("metrics listener {addr}: {e}")))?,
        ),
        None => None,
    };

    // Every source that will run is registered before anything else reports: the daemon is
    // ready only once each one streams from its consistent point (sinks that answer first
    // must not make it ready while a slot does not exist yet).
    let sources: Vec<String> =
        config.sources.keys().filter(|n| pipelines.iter().any(|p| &*p.source == n.as_str())).cloned().collect();
    for name in config.sources.keys().filter(|n| !sources.contains(n)) {
        tracing::warn!(source = %name, "no pipeline reads this source; it is not started");
    }
    for name in &sources {
        health.set(&format!("source {name}"), Err("starting: not streaming yet".into()));
    }

    // Spools of sinks no longer configured: their records go to the dead-letter queue.
    let spool_dir = config.state_dir.join("spool");
    let configured = config.sinks.keys().cloned().collect();
    crate::runtime::spool_drain::orphans(&spool_dir, &configured, &dlq, &d.hard_stop).await.map_err(AppError::Local)?;

    // Sinks and pipelines.
    let lanes = config.runtime.lanes;
    let rt = SinkRuntime {
        dlq: Arc::clone(&dlq),
        health: Arc::clone(&health),
        hard_stop: d.hard_stop.clone(),
        tasks: d.tasks.clone(),
    };
    let settings = QueueSettings {
        lanes,
        lane_capacity: config.runtime.lane_capacity,
        spill_after: config.runtime.spill_after,
        spool_bytes: config.runtime.spool_max_bytes.0,
        spool_dir,
        retire_deadline: config.runtime.shutdown_timeout,
    };
    let mut topology = Topology::new(rt, settings);
    let sink_ctx = config.sink_context();
    let Some(plan) =
        topology.plan(&config.sinks, &sink_ctx, &pipelines, &health, Patience::UntilStopped, &stop).await?
    else {
        return Ok(finish(d, None, http_stop, http, true).await);
    };
    topology.install(plan);

    // Pipeline lanes.
    let mut lane_tasks = Vec::with_capacity(lanes);
    let mut senders = Vec::with_capacity(lanes);
    for index in 0..lanes {
        let (tx, rx) = mpsc::channel(config.runtime.lane_capacity);
        senders.push(tx);
        lane_tasks.push(d.tasks.spawn(lane::run(LaneInputs {
            index,
            rx,
            pipelines: Arc::clone(&topology.set),
            dlq: Arc::clone(&dlq),
            hard_stop: d.hard_stop.clone(),
        })));
    }
    let router = Router::new(senders);
    let output: Arc<dyn Output> = Arc::new(router);

    // Sources: every check passes before any starts streaming.
    let mut prepared = Vec::new();
    for name in &sources {
        match prepare_source(name, &config, &pipelines, &health, &stop).await {
            Ok(Some(src)) => prepared.push(src),
            Ok(None) => return Ok(finish(d, Some(topology), http_stop, http, true).await),
            Err(e) => {
                // A refusal to start: every task (and the listener) ends before the error
                // is returned, so a caller that runs the daemon again finds nothing left over.
                finish(d, Some(topology), http_stop, http, true).await;
                return Err(e);
            }
        }
    }
    let admins: BTreeMap<String, Arc<dyn SourceAdmin>> =
        prepared.iter().map(|s| (s.name().to_string(), s.admin())).collect();
    let total_sources = prepared.len();
    let (fail_tx, mut fail_rx) = mpsc::channel::<SourceError>(total_sources.max(1));
    let mut source_tasks: Vec<JoinHandle<()>> = Vec::new();
    for src in prepared {
        let ctx = RunContext {
            output: Arc::clone(&output),
            rejects: Arc::new(SourceRejects { dlq: Arc::clone(&dlq), hard_stop: d.hard_stop.clone() }),
            health: Arc::clone(&health),
            cancel: d.cancel.clone(),
            hard_stop: d.hard_stop.clone(),
        };
        let fail_tx = fail_tx.clone();
        source_tasks.push(d.tasks.spawn(async move {
            if let Err(e) = src.run(ctx).await {
                let _ = fail_tx.send(e).await;
            }
        }));
    }
    drop(fail_tx);
    drop(output);
    tracing::info!(pipelines = pipelines.len(), sinks = topology.sinks.len(), lanes, "polysync running");
    // READY once every source streams and every sink answers; watchdog pings while running.
    {
        let (health, notifier, stop) = (Arc::clone(&health), notifier.clone(), d.background.clone());
        d.tasks.spawn(async move {
            loop {
                if health.readiness().is_ok() {
                    notifier.notify("READY=1\nSTATUS=streaming");
                    tracing::info!("ready: sources streaming, sinks answering");
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
    }
    if let Some(every) = Notifier::watchdog_interval() {
        let (notifier, stop) = (notifier.clone(), d.background.clone());
        d.tasks.spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => notifier.notify("WATCHDOG=1"),
                }
            }
        });
    }

    // Serve reloads until a stop request or a fatal source error.
    let mut reloader = Reloader::new(config.clone(), topology, admins, Arc::clone(&health));
    let mut failed = 0;
    let failure = loop {
        tokio::select! {
            _ = stop.cancelled() => break None,
            _ = d.hard_stop.cancelled() => break None,
            Some(e) = fail_rx.recv() => {
                // A failed source stops alone; the daemon ends when none is left.
                failed += 1;
                tracing::error!(error = %e, "source stopped");
                if failed >= total_sources {
                    break Some(e);
                }
            }
            Some(trigger) = reload_rx.recv() => {
                notifier.notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
                tokio::select! {
                    _ = reloader.reload(trigger, &stop) => {}
                    _ = stop.cancelled() => break None,
                }
                notifier.notify("READY=1");
            }
        }
    };
    if failure.is_some() {
        tracing::error!("no source is left running; shutting down");
    } else {
        tracing::info!("shutdown requested; draining in-flight changes (send the signal again to exit at once)");
    }
    notifier.notify("STOPPING=1\nSTATUS=draining in-flight changes");
    d.background.cancel();

    // Orderly shutdown with a deadline: sources drain and confirm first.
    let deadline = tokio::time::Instant::now() + config.runtime.shutdown_timeout;
    d.cancel.cancel();
    let drained = {
        let sources = futures::future::join_all(source_tasks.iter_mut());
        tokio::select! {
            _ = sources => true,
            _ = tokio::time::sleep_until(deadline) => false,
            _ = d.hard_stop.cancelled() => false,
        }
    };
    if !drained {
        tracing::warn!(
            "shutdown deadline passed (or second signal); abandoning in-flight changes, they replay on restart"
        );
        d.hard_stop.cancel();
        for t in source_tasks {
            let _ = t.await;
        }
    }
    // The lanes end once every source's partition is gone; then the sinks.
    let topology = reloader.into_topology();
    let lanes_done = futures::future::join_all(lane_tasks);
    if tokio::time::timeout(Duration::from_secs(5), lanes_done).await.is_err() {
        d.hard_stop.cancel();
    }
    let stopped = finish(d, Some(topology), http_stop, http, drained).await;
    match failure {
        Some(e) => Err(AppError::Source(e)),
        None => Ok(stopped),
    }
}

/// Close the sinks, wait for every task (briefly), stop the listener.
async fn finish(
    d: Daemon,
    topology: Option<Topology>,
    http_stop: CancellationToken,
    http: Option<JoinHandle<()>>,
    clean: bool,
) -> Stopped {
    d.background.cancel();
    d.cancel.cancel();
    if let Some(mut t) = topology {
        t.close();
    }
    d.tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), d.tasks.wait()).await.is_err() {
        d.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), d.tasks.wait()).await;
    }
    http_stop.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    tracing::info!(clean, "polysync stopped");
    Stopped { clean }
}
