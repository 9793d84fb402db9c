//! Which snapshot tasks run: initial snapshots of pipelines that never had one, requests from
//! the signal table, and re-reads after a column change; each recorded before it starts and
//! run up to the source's parallelism.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::chunk_reader::{self, TaskContext};
use super::coordinator::Coordinator;
use crate::change::Name;
use crate::checkpoint::snapshot::{ProgressStore, SnapshotProgress, SnapshotTask, TaskState, progress_path};
use crate::source::postgres::config::{ConnInfo, SnapshotSettings};
use crate::source::postgres::setup::Catalog;

/// Everything the snapshot manager of one source needs.
pub struct Manager {
    /// Source name.
    pub source: Name,
    /// Connection settings (workers open their own connections).
    pub info: ConnInfo,
    /// Primary keys and published tables.
    pub catalog: Arc<ArcSwap<Catalog>>,
    /// Chunk size, parallelism, rate.
    pub settings: SnapshotSettings,
    /// Where the progress file lives.
    pub state_dir: PathBuf,
    /// Pipelines of this source: name, relations, `snapshot = "initial"` (replaced by reloads).
    pub pipelines: crate::source::postgres::SnapshotPipelines,
    /// The source's partition (its confirmed position).
    pub partition: Arc<dyn crate::source::Partition>,
    /// Shared with the stream.
    pub coordinator: Arc<Coordinator>,
    /// Stop.
    pub cancel: CancellationToken,
}

/// The manager's side of the shared task context: recording what a request adds.
impl TaskContext {
    /// Record the tasks the request adds; a failure is logged (the request is not lost on
    /// disk only if it was written, so it is named).
    async fn record(&self, what: &str, f: impl FnOnce(&mut SnapshotProgress)) -> bool {
        match self.progress.change(f).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(source = %self.source, error = %e, "could not record {what}");
                false
            }
        }
    }
}

impl Manager {
    /// Run snapshot tasks (initial ones, resumed ones, signalled ones) until cancelled.
    pub async fn run(self) {
        let Manager { source, info, catalog, settings, state_dir, pipelines, partition, coordinator, cancel } = self;
        let progress = match ProgressStore::open(progress_path(&state_dir, &source)) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(source = %source, error = %e, "snapshots disabled: cannot read their progress");
                return;
            }
        };
        let rate = settings.max_rows_per_second.map(|_| Mutex::new((Instant::now(), 0)));
        let shared = Arc::new(TaskContext {
            source,
            info,
            catalog,
            settings,
            pipelines,
            partition,
            coordinator,
            cancel,
            progress,
            rate,
        });
        let m = &*shared;
        if !queue_initial(&shared).await {
            tracing::error!(source = %m.source, "snapshots disabled: cannot record their progress");
            return;
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(m.settings.parallelism()));
        let mut running: HashSet<String> = HashSet::new();
        let mut tasks = tokio::task::JoinSet::new();
        let mut column_retries: HashMap<String, u32> = HashMap::new();
        // Reloads replace the pipelines without a signal: look for new ones now and then.
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            // Signals → tasks.
            for s in m.coordinator.take_signals() {
                shared.record("a snapshot request", |p| queue_signal(m, p, &s)).await;
            }
            // Column changes → a re-read of the table in every pipeline that reads it.
            for r in m.coordinator.take_rereads() {
                if shared.record("the re-read after a column change", |p| queue_reread(m, p, &r.relation)).await {
                    (r.queued)();
                } else {
                    tracing::error!(source = %m.source, table = %r.relation, "the re-read after a column change is queued again at the next start");
                }
            }
            // Pipelines a reload added with `snapshot = "initial"`.
            queue_initial(&shared).await;
            // Start what is pending (or was interrupted).
            let todo: Vec<String> = shared.progress.read(|p| {
                p.tasks
                    .iter()
                    .filter(|t| matches!(t.state, TaskState::Pending | TaskState::Running) && !running.contains(&t.id))
                    .map(|t| t.id.clone())
                    .collect()
            });
            for id in todo {
                running.insert(id.clone());
                let (shared, slots) = (Arc::clone(&shared), Arc::clone(&slots));
                tasks.spawn(async move {
                    let _permit = slots.acquire_owned().await;
                    let r = chunk_reader::run_task(&shared, &id).await;
                    (id, r)
                });
            }
            tokio::select! {
                _ = m.cancel.cancelled() => break,
                _ = m.coordinator.wake.notified() => {}
                _ = tick.tick() => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok((id, r)) = done {
                        running.remove(&id);
                        match r {
                            // A column dropped or renamed while the task read the table
                            // (undefined_column): read its shape again and go on from the last
                            // applied chunk, a few times, rather than fail the task.
                            Err(msg) if msg.contains("ERROR 42703") && *column_retries.entry(id.clone()).or_insert(0) < 5 => {
                                *column_retries.entry(id.clone()).or_insert(0) += 1;
                                tracing::warn!(source = %m.source, task = %id, error = %msg, "the table's columns changed while it was read; reading on with its new shape");
                                if let Err(e) = shared.update(&id, |t| t.state = TaskState::Pending).await {
                                    tracing::error!(source = %m.source, task = %id, error = %e, "could not record the snapshot's restart; it resumes at the next start");
                                }
                            }
                            Err(msg) => {
                                tracing::error!(source = %m.source, task = %id, error = %msg, "snapshot failed");
                                if let Err(e) = shared.update(&id, |t| { t.state = TaskState::Failed; t.error = Some(msg); }).await {
                                    tracing::error!(source = %m.source, task = %id, error = %e, "could not record the snapshot's failure");
                                }
                            }
                            Ok(_) => {}
                        }
                    }
                }
            }
        }
        tasks.abort_all();
    }
}

/// Initial snapshots of pipelines that never had one (at start, and for pipelines a reload adds).
fn missing_initial(m: &TaskContext, p: &SnapshotProgress) -> Vec<SnapshotTask> {
    let catalog = m.catalog.load();
    let (published, signal_table) = (&catalog.published, catalog.signal_table.as_ref());
    let mut out = Vec::new();
    for (name, rels, _) in m.pipelines.load().iter().filter(|p| p.2) {
        for t in published.iter().filter(|t| rels.iter().any(|r| r.matches(t)) && Some(*t) != signal_table) {
            let id = format!("initial:{name}:{t}");
            if !p.tasks.iter().any(|x| x.id == id) {
                out.push(SnapshotTask::new(id, name, t, None));
            }
        }
    }
    out
}

/// Record the missing initial snapshots; false when they could not be recorded.
async fn queue_initial(shared: &TaskContext) -> bool {
    let m = shared;
    let new = shared.progress.read(|p| missing_initial(m, p));
    if new.is_empty() {
        return true;
    }
    shared
        .record("the initial snapshots", |p| {
            for t in new {
                tracing::info!(source = %m.source, pipeline = %t.pipeline, table = %t.relation, "initial snapshot requested");
                p.add(t);
            }
        })
        .await
}

/// A request from the signal table. One that cannot be served is recorded as failed, with the
/// reason, so `polysync snapshot --wait` and `status` report the daemon's answer.
fn queue_signal(m: &TaskContext, p: &mut SnapshotProgress, s: &super::Signal) {
    let pipelines = m.pipelines.load();
    let catalog = m.catalog.load();
    let (published, signal_table) = (&catalog.published, catalog.signal_table.as_ref());
    let mut reject = |table: &str, why: String| {
        tracing::error!(source = %m.source, signal = s.id, pipeline = %s.pipeline, table, reason = %why, "snapshot request rejected");
        let mut t = SnapshotTask::new(format!("signal:{}:{table}", s.id), &s.pipeline, table, s.filter.clone());
        t.state = TaskState::Failed;
        t.error = Some(why);
        p.add(t);
    };
    let Some((_, rels, _)) = pipelines.iter().find(|(n, _, _)| **n == *s.pipeline) else {
        return reject(
            s.relation.as_deref().unwrap_or("*"),
            format!("source {} runs no pipeline named {:?}", m.source, s.pipeline),
        );
    };
    let tables: Vec<String> = match &s.relation {
        Some(t) => {
            let t = if t.contains('.') { t.clone() } else { format!("public.{t}") };
            if !rels.iter().any(|r| r.matches(&t)) {
                return reject(&t, format!("pipeline {} does not read {t}", s.pipeline));
            }
            if !published.contains(&t) {
                return reject(&t, format!("{t} is not in the publication"));
            }
            vec![t]
        }
        None => published
            .iter()
            .filter(|t| rels.iter().any(|r| r.matches(t)) && Some(*t) != signal_table)
            .cloned()
            .collect(),
    };
    if tables.is_empty() {
        return reject("*", format!("pipeline {} reads no published table", s.pipeline));
    }
    for t in tables {
        if p.add(SnapshotTask::new(format!("signal:{}:{t}", s.id), &s.pipeline, &t, s.filter.clone())) {
            tracing::info!(source = %m.source, pipeline = %s.pipeline, table = %t, filter = ?s.filter, "snapshot requested");
        }
    }
}

/// A table whose columns changed, read again through every pipeline that reads it.
fn queue_reread(m: &TaskContext, p: &mut SnapshotProgress, relation: &str) {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    for (pipeline, rels, _) in m.pipelines.load().iter() {
        if rels.iter().any(|x| x.matches(relation))
            && p.add(SnapshotTask::new(format!("schema:{stamp}:{pipeline}:{relation}"), pipeline, relation, None))
        {
            tracing::info!(source = %m.source, pipeline = %pipeline, table = %relation, "re-read queued after a column change");
        }
    }
}
