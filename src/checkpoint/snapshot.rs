//! Snapshot progress: one JSON file per source in the state directory, rewritten atomically
//! (temporary file, fsync, rename) after every finished chunk, so a crash resumes a snapshot
//! at the last chunk whose rows every sink applied. `polysync status` reads the same file.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a snapshot task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Not started yet, or interrupted (it resumes from `last_key`).
    Pending,
    /// Reading chunks.
    Running,
    /// Every chunk read and applied.
    Done,
    /// Stopped for a reason a person must fix (`error`).
    Failed,
}

/// One table of one snapshot request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotTask {
    /// `initial:<pipeline>:<table>`, `signal:<signal id>:<table>` or
    /// `resnapshot:<time>:<pipeline>:<table>`: a request is recorded once.
    pub id: String,
    /// The pipeline whose sinks receive the rows (others do not see them).
    pub pipeline: String,
    /// `schema.table`.
    pub relation: String,
    /// Extra SQL condition (`--where`), if any.
    pub filter: Option<String>,
    /// Primary-key values (text) of the last row of the last applied chunk.
    pub last_key: Option<Vec<String>>,
    /// Rows emitted so far.
    pub rows: u64,
    /// Chunks applied so far.
    pub chunks: u64,
    /// Row estimate of the table when the task started (`pg_class.reltuples`), if known.
    pub estimate: Option<u64>,
    /// State.
    pub state: TaskState,
    /// Why it failed.
    pub error: Option<String>,
    /// When it was requested.
    pub requested: DateTime<Utc>,
    /// Last progress.
    pub updated: DateTime<Utc>,
    /// Clear the table in the pipeline's sinks before the first chunk (a re-read after a
    /// lost slot: rows deleted in the gap must go too).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clear_first: bool,
}

/// Every snapshot task of one source.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SnapshotProgress {
    /// Tasks in request order.
    pub tasks: Vec<SnapshotTask>,
}

/// I/O failure of the progress file (the snapshot stops rather than lose its place).
#[derive(Debug, thiserror::Error)]
#[error("snapshot progress {path}: {msg}")]
pub struct ProgressError {
    /// File.
    pub path: PathBuf,
    /// What went wrong.
    pub msg: String,
}

/// The progress file of `source` under `state_dir`.
pub fn progress_path(state_dir: &Path, source: &str) -> PathBuf {
    state_dir.join(format!("snapshot-{source}.json"))
}

impl SnapshotProgress {
    /// Read the file; a missing file is an empty progress.
    pub fn load(path: &Path) -> Result<SnapshotProgress, ProgressError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ProgressError { path: path.to_owned(), msg: format!("unreadable: {e}") }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SnapshotProgress::default()),
            Err(e) => Err(ProgressError { path: path.to_owned(), msg: e.to_string() }),
        }
    }

    /// Replace the file atomically (mode 0600).
    pub fn save(&self, path: &Path) -> Result<(), ProgressError> {
        let body =
            serde_json::to_vec_pretty(self).map_err(|e| ProgressError { path: path.to_owned(), msg: e.to_string() })?;
        super::file::write_atomic(path, &body).map_err(|e| ProgressError { path: path.to_owned(), msg: e.to_string() })
    }

    /// The task with this id.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut SnapshotTask> {
        self.tasks.iter_mut().find(|t| t.id == id)
    }

    /// Record a task unless one with its id exists; true when added.
    pub fn add(&mut self, task: SnapshotTask) -> bool {
        if self.tasks.iter().any(|t| t.id == task.id) {
            return false;
        }
        self.tasks.push(task);
        true
    }
}

/// The progress of one source's snapshots as the running daemon holds it: the tasks in memory
/// for the workers, and the file written after each change off the runtime's threads (an
/// fsync under a lock on an async worker would stall every task scheduled on it). Writes are
/// serialised and each writes the state as it is when its turn comes, so the file only ever
/// moves forward, whatever order the callers finish in.
#[derive(Debug)]
pub struct ProgressStore {
    state: Mutex<SnapshotProgress>,
    path: PathBuf,
    write: tokio::sync::Mutex<()>,
}

impl ProgressStore {
    /// Read the file (a missing file is an empty progress).
    pub fn open(path: PathBuf) -> Result<ProgressStore, ProgressError> {
        let state = Mutex::new(SnapshotProgress::load(&path)?);
        Ok(ProgressStore { state, path, write: tokio::sync::Mutex::new(()) })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, SnapshotProgress> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Look at the tasks (no I/O).
    pub fn read<R>(&self, f: impl FnOnce(&SnapshotProgress) -> R) -> R {
        f(&self.lock())
    }

    /// A copy of one task.
    pub fn task(&self, id: &str) -> Option<SnapshotTask> {
        self.lock().tasks.iter().find(|t| t.id == id).cloned()
    }

    /// Change the tasks, then record them durably; the result of `f` once the file holds it.
    pub async fn change<R>(&self, f: impl FnOnce(&mut SnapshotProgress) -> R) -> Result<R, ProgressError> {
        let r = f(&mut self.lock());
        self.persist().await?;
        Ok(r)
    }

    /// Change one task (stamping its `updated`) and record it; a missing task changes nothing.
    pub async fn update(&self, id: &str, f: impl FnOnce(&mut SnapshotTask)) -> Result<(), ProgressError> {
        self.change(|p| {
            if let Some(t) = p.get_mut(id) {
                f(t);
                t.updated = Utc::now();
            }
        })
        .await
    }

    async fn persist(&self) -> Result<(), ProgressError> {
        let _turn = self.write.lock().await;
        let err = |msg: String| ProgressError { path: self.path.clone(), msg };
        let body = serde_json::to_vec_pretty(&*self.lock()).map_err(|e| err(e.to_string()))?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || super::file::write_atomic(&path, &body))
            .await
            .map_err(|e| err(format!("the write task failed: {e}")))?
            .map_err(|e| err(e.to_string()))
    }
}

impl SnapshotTask {
    /// A new pending task.
    pub fn new(id: String, pipeline: &str, relation: &str, filter: Option<String>) -> SnapshotTask {
        let now = Utc::now();
        SnapshotTask {
            id,
            pipeline: pipeline.to_string(),
            relation: relation.to_string(),
            filter,
            last_key: None,
            rows: 0,
            chunks: 0,
            estimate: None,
            state: TaskState::Pending,
            error: None,
            requested: now,
            updated: now,
            clear_first: false,
        }
    }

    /// One line for `polysync status`.
    pub fn describe(&self) -> String {
        let pct = match self.estimate {
            Some(e) if e > 0 && self.state != TaskState::Done => format!(" (~{}%)", (self.rows * 100 / e).min(99)),
            _ => String::new(),
        };
        let secs = (self.updated - self.requested).num_milliseconds().max(1) as f64 / 1000.0;
        format!(
            "{:<8} {} → pipeline {}: {} rows{} in {} chunks, {:.0} rows/s{}{}",
            format!("{:?}", self.state).to_lowercase(),
            self.relation,
            self.pipeline,
            self.rows,
            pct,
            self.chunks,
            self.rows as f64 / secs,
            self.filter.as_ref().map(|f| format!(", where {f}")).unwrap_or_default(),
            self.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_round_trips_and_ids_are_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = progress_path(dir.path(), "shop");
        let mut p = SnapshotProgress::load(&path).unwrap();
        assert!(p.tasks.is_empty());
        assert!(p.add(SnapshotTask::new("initial:a:public.t".into(), "a", "public.t", None)));
        assert!(!p.add(SnapshotTask::new("initial:a:public.t".into(), "a", "public.t", None)));
        p.get_mut("initial:a:public.t").unwrap().last_key = Some(vec!["42".into(), "x,y".into()]);
        p.save(&path).unwrap();
        let back = SnapshotProgress::load(&path).unwrap();
        assert_eq!(back.tasks[0].last_key.as_deref(), Some(&["42".to_string(), "x,y".to_string()][..]));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_updates_leave_the_file_with_the_latest_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = progress_path(dir.path(), "shop");
        let store = std::sync::Arc::new(ProgressStore::open(path.clone()).unwrap());
        store.change(|p| p.add(SnapshotTask::new("t".into(), "a", "public.t", None))).await.unwrap();
        let mut writers = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let store = std::sync::Arc::clone(&store);
            writers.spawn(async move { store.update("t", |t| t.chunks += 1).await.unwrap() });
        }
        while writers.join_next().await.is_some() {}
        assert_eq!(store.task("t").unwrap().chunks, 50);
        assert_eq!(SnapshotProgress::load(&path).unwrap().tasks[0].chunks, 50, "the file holds the last state");
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("snapshot-shop.json");
        let store = ProgressStore::open(path).unwrap();
        let e = store.change(|p| p.add(SnapshotTask::new("t".into(), "a", "public.t", None))).await.unwrap_err();
        assert!(e.to_string().contains("missing-dir"), "{e}");
    }
}
