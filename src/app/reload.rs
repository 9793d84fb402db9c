//! Live reload: what triggers one (SIGHUP, handed in by `main`, and edits to the config file or
//! the pipelines directory, debounced so an editor's save-rename-chmod dance is one reload) and
//! what it does (parse, compile and check the new set; swap it in only if all of it is good).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{AppError, source_needs};
use crate::app::Config;
use crate::pipeline::load;
use crate::runtime::topology::{Patience, Topology};
use crate::source::SourceAdmin;
use crate::telemetry::{Health, metrics};

/// Quiet period after the last file event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(400);

/// Why a reload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP (systemd `ExecReload`, `kill -HUP`).
    Signal,
    /// A watched file changed.
    FileChange,
}

fn relevant(path: &Path, config: &Path, pipelines: &Path) -> bool {
    path == config || (path.parent() == Some(pipelines) && path.extension().is_some_and(|e| e == "toml"))
}

/// Watch the config file and the pipelines directory; send a trigger after each burst of
/// changes. Returns the watcher, which must be kept alive.
pub fn watch(
    config: &Path,
    pipelines: &Path,
    tx: mpsc::Sender<Trigger>,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> notify::Result<notify::RecommendedWatcher> {
    let config = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_owned());
    let pipelines = std::fs::canonicalize(pipelines).unwrap_or_else(|_| pipelines.to_owned());
    let (raw_tx, mut raw_rx) = mpsc::channel::<()>(1);
    let (cfg_path, dir) = (config.clone(), pipelines.clone());
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev.kind.is_access() {
                return;
            }
            if ev.paths.iter().any(|p| relevant(p, &cfg_path, &dir)) {
                let _ = raw_tx.try_send(());
            }
        }
    })?;
    let config_dir: PathBuf = config.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    watcher.watch(&config_dir, RecursiveMode::NonRecursive)?;
    if pipelines != config_dir {
        watcher.watch(&pipelines, RecursiveMode::NonRecursive)?;
    }
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = raw_rx.recv() => if r.is_none() { return },
            }
            // Debounce: wait until the files are quiet.
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                    r = raw_rx.recv() => if r.is_none() { return },
                }
            }
            let _ = tx.try_send(Trigger::FileChange);
        }
    });
    Ok(watcher)
}

/// Everything a reload needs to validate and swap.
pub struct Reloader {
    config: Config,
    topology: Topology,
    admins: BTreeMap<String, Arc<dyn SourceAdmin>>,
    health: Arc<Health>,
}

impl Reloader {
    /// A reloader over the running topology and sources.
    pub fn new(
        config: Config,
        topology: Topology,
        admins: BTreeMap<String, Arc<dyn SourceAdmin>>,
        health: Arc<Health>,
    ) -> Reloader {
        Reloader { config, topology, admins, health }
    }

    /// The topology, for shutdown.
    pub fn into_topology(self) -> Topology {
        self.topology
    }

    /// Parse, compile and check the new set; swap it in only if everything succeeds.
    pub async fn reload(&mut self, trigger: Trigger, stop: &CancellationToken) {
        let result = self.try_reload(stop).await;
        let m = metrics();
        match result {
            Ok(summary) => {
                m.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(?trigger, %summary, "reloaded");
                self.health.reloaded(true, summary);
            }
            Err(e) => {
                m.config_reloads.with_label_values(&["error"]).inc();
                self.health.reloaded(false, e.to_string());
                for line in e.to_string().lines() {
                    tracing::error!(?trigger, error = %line, "reload failed; the previous pipelines keep running");
                }
            }
        }
    }

    async fn try_reload(&mut self, stop: &CancellationToken) -> Result<String, AppError> {
        let config = Config::load(&self.config.path)?;
        let pipelines = load::load_all(&config.pipeline_env())?;
        // What a reload cannot change while running: say so instead of pretending.
        let mut notes = Vec::new();
        let sources_changed = config.sources.len() != self.config.sources.len()
            || config.sources.iter().any(|(n, c)| self.admins.get(n).is_some_and(|a| !a.same_config(c)))
            || config.sources.keys().any(|n| !self.config.sources.contains_key(n));
        if sources_changed {
            notes.push("source settings changed (take effect at restart)");
        }
        if config.runtime.lanes != self.config.runtime.lanes
            || config.runtime.max_in_flight != self.config.runtime.max_in_flight
            || config.runtime.lane_capacity != self.config.runtime.lane_capacity
        {
            notes.push("runtime limits changed (take effect at restart)");
        }
        if config.metrics.listen != self.config.metrics.listen || config.metrics.enabled != self.config.metrics.enabled
        {
            notes.push("metrics listener changed (takes effect at restart)");
        }
        for p in &pipelines {
            if !self.admins.contains_key(&*p.source) {
                return Err(AppError::Local(format!(
                    "pipeline {} ({}) reads source {}, which is not running; sources start only with the daemon",
                    p.name,
                    p.file.display(),
                    p.source
                )));
            }
        }
        for (name, admin) in &self.admins {
            admin.recheck(&source_needs(&pipelines, name)).await?;
        }
        let ctx = config.sink_context();
        let plan = self
            .topology
            .plan(&config.sinks, &ctx, &pipelines, &self.health, Patience::Once(Duration::from_secs(15)), stop)
            .await?
            .ok_or_else(|| AppError::Local("stopping".into()))?;
        let mut summary = plan.summary.clone();
        self.topology.install(plan);
        self.config = config;
        if !notes.is_empty() {
            summary.push_str("; ");
            summary.push_str(&notes.join("; "));
        }
        Ok(summary)
    }
}
