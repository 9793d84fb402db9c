//! DynamoDB backfill: a parallel `Scan` (`Segment` / `TotalSegments`) fed through the same
//! pipelines as the stream, merged with it by version.
//!
//! Scan rows are `read` changes versioned at the time their page was read minus a clock margin
//! (`(read − 2 s) << 30`, the same scale as stream changes, see [`crate::sink::version`]).
//! Any write to an item after the page was read is newer and wins wherever it lands; any older
//! stream record still in the backlog is refused by the sink's guard, because the scan row
//! already holds a state at least that new. A row whose item the stream has meanwhile handed
//! over a newer record of is dropped before it is handed over ([`super::scan_fence`]), so a
//! page delayed by backpressure can never bring back an item deleted while it waited. Progress is each segment's `LastEvaluatedKey`,
//! saved only when every row of the page before it is applied, so a crash resumes each segment
//! at its last applied page. Memory is one page per segment.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use base64::Engine;
use tokio_util::sync::CancellationToken;

use crate::change::{Change, Name, Op, Position, Row, SNAPSHOT_ORIGIN, Version};
use crate::checkpoint::snapshot::{ProgressStore, SnapshotTask, TaskState, progress_path};
use crate::sink::version::DDB_SHIFT;
use crate::source::Output;
use crate::telemetry::metrics;

/// Seconds subtracted from the scan's start: larger than any plausible clock skew between
/// this host and DynamoDB's `ApproximateCreationDateTime`.
const CLOCK_MARGIN_SECS: i64 = 2;

/// By default, a row that waited this long for room is read again (consistent `GetItem`) before it is
/// handed over. The fence only sees the stream records of shards this instance reads; with a
/// lease table another instance may apply an item's delete, and a sink forgets tombstones
/// after a while (OpenSearch: `index.gc_deletes`, 60 s by default). A row re-read just before
/// hand-over is never older than that memory, wherever the delete was applied.
/// (`backfill_recheck_after`).
pub const RECHECK_AFTER: Duration = Duration::from_secs(10);

/// Directory where `polysync snapshot` drops requests for DynamoDB sources.
pub fn requests_dir(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("snapshot-requests")
}

/// A request file: pipeline and optional filter-free table scan.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Request {
    /// Source the request is for.
    pub source: String,
    /// Pipeline to feed.
    pub pipeline: String,
}

/// File a backfill request for a running daemon (it looks every two seconds).
pub fn request(state_dir: &std::path::Path, source: &str, pipeline: &str) -> std::io::Result<String> {
    let dir = requests_dir(state_dir);
    std::fs::create_dir_all(&dir)?;
    let id = format!("{}", chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default());
    let tmp = dir.join(format!(".{id}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&Request { source: source.into(), pipeline: pipeline.into() })?)?;
    std::fs::rename(&tmp, dir.join(format!("{id}.json")))?;
    Ok(id)
}

/// `LastEvaluatedKey` (key attributes are S, N or B) as JSON text for the progress file.
fn key_to_json(k: &HashMap<String, AttributeValue>) -> String {
    let mut o = serde_json::Map::new();
    for (n, v) in k {
        let tv = match v {
            AttributeValue::S(s) => serde_json::json!({ "S": s }),
            AttributeValue::N(s) => serde_json::json!({ "N": s }),
            AttributeValue::B(b) => {
                serde_json::json!({ "B": base64::engine::general_purpose::STANDARD.encode(b.as_ref()) })
            }
            _ => serde_json::Value::Null,
        };
        o.insert(n.clone(), tv);
    }
    serde_json::Value::Object(o).to_string()
}

fn key_from_json(s: &str) -> Option<HashMap<String, AttributeValue>> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    let mut out = HashMap::new();
    for (n, tv) in v.as_object()? {
        let av = if let Some(s) = tv.get("S").and_then(|s| s.as_str()) {
            AttributeValue::S(s.into())
        } else if let Some(s) = tv.get("N").and_then(|s| s.as_str()) {
            AttributeValue::N(s.into())
        } else {
            let b = base64::engine::general_purpose::STANDARD.decode(tv.get("B")?.as_str()?).ok()?;
            AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(b))
        };
        out.insert(n.clone(), av);
    }
    Some(out)
}

/// Segment progress marker: not started, a resume key, or finished.
const SEGMENT_DONE: &str = "done";

/// Everything a DynamoDB source's backfills need.
pub struct Backfiller {
    /// Source name.
    pub source: Name,
    /// Relation name (the table).
    pub relation: Name,
    /// Table name.
    pub table: String,
    /// DynamoDB client.
    pub client: aws_sdk_dynamodb::Client,
    /// Key attribute names.
    pub key_names: Vec<String>,
    /// Parallel segments.
    pub segments: usize,
    /// Items per Scan page.
    pub page_size: i32,
    /// Read a row again when it waited this long ([`RECHECK_AFTER`] by default).
    pub recheck_after: Duration,
    /// Window size per segment.
    pub max_in_flight: usize,
    /// State directory (progress, requests).
    pub state_dir: PathBuf,
    /// Pipelines of this source: name, relations, `snapshot = "initial"`.
    pub pipelines: crate::source::postgres::SnapshotPipelines,
    /// Start initial backfills (one instance only: with a lease table, request them instead).
    pub initial_allowed: bool,
    /// Lanes.
    pub output: Arc<dyn Output>,
    /// Stop.
    pub cancel: CancellationToken,
    /// Shard readers holding their first iterator …
    pub positioned: Arc<std::sync::atomic::AtomicUsize>,
    /// … out of the readers started.
    pub spawned: Arc<std::sync::atomic::AtomicUsize>,
    /// Shared with this source's shard readers: rows superseded by the stream are dropped.
    pub fence: Arc<super::scan_fence::ScanFence>,
}

impl Backfiller {
    /// Wait until every started shard reader has its position: from then on every write is in
    /// what the stream will deliver, so a scan started now misses nothing.
    /// With a lease table this instance may read no shard at all (the others hold them, and
    /// their readers are positioned): after a grace period the scan starts anyway, and rows
    /// delayed on their way are read again before hand-over ([`RECHECK_AFTER`]).
    async fn wait_for_readers(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let since = std::time::Instant::now();
        loop {
            let spawned = self.spawned.load(SeqCst);
            if spawned > 0 && self.positioned.load(SeqCst) >= spawned {
                return true;
            }
            if spawned == 0 && !self.initial_allowed && since.elapsed() > Duration::from_secs(15) {
                tracing::info!(source = %self.source, "this instance reads no shard of the stream (the lease table gives them to others); backfilling anyway");
                return true;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return false,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// Run initial and requested backfills until cancelled.
    pub async fn run(self) {
        let progress = match ProgressStore::open(progress_path(&self.state_dir, &self.source)) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(source = %self.source, error = %e, "backfills disabled: cannot read their progress");
                return;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut warned = std::collections::HashSet::new();
        loop {
            self.queue_initial(&progress, &mut warned).await;
            self.take_requests(&progress).await;
            let next = progress
                .read(|p| p.tasks.iter().find(|t| matches!(t.state, TaskState::Pending | TaskState::Running)).cloned());
            if let Some(task) = next {
                if !self.wait_for_readers().await {
                    return;
                }
                if let Err(msg) = self.run_task(&progress, &task).await {
                    tracing::error!(source = %self.source, pipeline = %task.pipeline, error = %msg, "backfill failed");
                    let failed = progress.update(&task.id, |t| {
                        t.state = TaskState::Failed;
                        t.error = Some(msg);
                    });
                    if let Err(e) = failed.await {
                        tracing::error!(source = %self.source, pipeline = %task.pipeline, error = %e, "could not record the backfill's failure");
                    }
                }
                if self.cancel.is_cancelled() {
                    return;
                }
                continue;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
        }
    }

    /// Initial backfills of pipelines that never had one (at start, and for pipelines a reload
    /// adds).
    async fn queue_initial(&self, progress: &ProgressStore, warned: &mut std::collections::HashSet<String>) {
        let mut new = Vec::new();
        for (name, rels, initial) in self.pipelines.load().iter() {
            let id = format!("initial:{name}:{}", self.relation);
            if !*initial || !rels.iter().any(|r| r.matches(&self.relation)) || progress.task(&id).is_some() {
                continue;
            }
            if !self.initial_allowed {
                if warned.insert(id) {
                    tracing::warn!(source = %self.source, pipeline = %name, "snapshot = \"initial\" is not started automatically with a lease table (every instance would scan); run `polysync snapshot --pipeline {name}` against one instance");
                }
                continue;
            }
            tracing::info!(source = %self.source, pipeline = %name, "initial backfill requested");
            new.push(SnapshotTask::new(id, name, &self.relation, None));
        }
        if new.is_empty() {
            return;
        }
        if let Err(e) = progress.change(|p| new.into_iter().for_each(|t| _ = p.add(t))).await {
            tracing::error!(source = %self.source, error = %e, "could not record the initial backfills; they are requested again");
        }
    }

    /// Requests `polysync snapshot` dropped into the state directory. Each becomes a task, or a
    /// failed task naming why, so the CLI reports the daemon's answer; the file is removed only
    /// once that is recorded.
    async fn take_requests(&self, progress: &ProgressStore) {
        let dir = requests_dir(&self.state_dir);
        let found = tokio::task::spawn_blocking(move || -> Vec<(PathBuf, Option<Request>)> {
            let Ok(rd) = std::fs::read_dir(&dir) else { return Vec::new() };
            let mut files: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            files.sort();
            files
                .into_iter()
                .map(|f| {
                    let req = std::fs::read(&f).ok().and_then(|b| serde_json::from_slice::<Request>(&b).ok());
                    (f, req)
                })
                .collect()
        })
        .await
        .unwrap_or_default();
        for (f, req) in found {
            let Some(req) = req else {
                tracing::warn!(source = %self.source, file = %f.display(), "unreadable snapshot request; left in place");
                continue;
            };
            if req.source != *self.source {
                continue;
            }
            let id = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let id = format!("signal:{id}:{}", self.relation);
            let served = self
                .pipelines
                .load()
                .iter()
                .any(|(n, rels, _)| **n == *req.pipeline && rels.iter().any(|r| r.matches(&self.relation)));
            let mut t = SnapshotTask::new(id, &req.pipeline, &self.relation, None);
            if served {
                tracing::info!(source = %self.source, pipeline = %req.pipeline, "backfill requested");
            } else {
                let why =
                    format!("source {} runs no pipeline {:?} that reads {}", self.source, req.pipeline, self.relation);
                tracing::error!(source = %self.source, pipeline = %req.pipeline, reason = %why, "backfill request rejected");
                t.state = TaskState::Failed;
                t.error = Some(why);
            }
            match progress.change(|p| p.add(t)).await {
                Ok(_) => {
                    let _ = tokio::fs::remove_file(&f).await;
                }
                Err(e) => {
                    tracing::error!(source = %self.source, error = %e, "could not record a backfill request; it is read again");
                    return;
                }
            }
        }
    }

    /// Read a delayed row's item again (consistent read): `None` when it is gone (its delete
    /// is or will be applied from the stream), otherwise the row as it is now, versioned now.
    async fn reread(
        &self,
        raw_key: &HashMap<String, AttributeValue>,
        mut change: Change,
    ) -> Result<Option<Change>, String> {
        let read_secs = chrono::Utc::now().timestamp() - CLOCK_MARGIN_SECS;
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(raw_key.clone()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| format!("GetItem {}: {}", self.table, crate::sink::search::aws_error_text(&e)))?;
        let Some(item) = got.item() else { return Ok(None) };
        let version = Version::from_u64((read_secs.max(0) as u64) << DDB_SHIFT);
        change.after = Some(super::decode::scanned_image(item));
        change.version = version;
        change.commit_time = chrono::DateTime::from_timestamp(read_secs, 0);
        if let Position::Snapshot { at, .. } = &mut change.position {
            *at = version;
        }
        Ok(Some(change))
    }

    async fn run_task(&self, progress: &ProgressStore, task: &SnapshotTask) -> Result<(), String> {
        // Key attributes in name order, as stream records give them: one item, one lane.
        let mut key_names = self.key_names.clone();
        key_names.sort();
        let key_names = &key_names;
        let mut segments = task.last_key.clone().unwrap_or_default();
        if segments.len() != self.segments {
            segments = vec![String::new(); self.segments]; // not started (or the segment count changed)
        }
        progress
            .update(&task.id, |t| {
                t.state = TaskState::Running;
                t.last_key = Some(segments.clone());
            })
            .await
            .map_err(|e| e.to_string())?;
        let shared = Arc::new(Mutex::new(segments));
        let origin = Name::from(format!("{SNAPSHOT_ORIGIN}{}", task.pipeline));
        let rows_metric = metrics().snapshot_rows.with_label_values(&[&*self.source, &*self.relation]);
        let mut futs = Vec::new();
        for seg in 0..self.segments {
            let (shared, origin, rows_metric) = (Arc::clone(&shared), Arc::clone(&origin), rows_metric.clone());
            futs.push(async move {
                let window = self.output.partition(&format!("{}-backfill-{seg}", self.source), self.max_in_flight, 0, None);
                loop {
                    let start = shared.lock().unwrap_or_else(|p| p.into_inner())[seg].clone();
                    if start == SEGMENT_DONE || self.cancel.is_cancelled() {
                        return Ok::<(), String>(());
                    }
                    let exclusive = if start.is_empty() { None } else { key_from_json(&start) };
                    // The page's state is at least as new as this moment.
                    let read_secs = chrono::Utc::now().timestamp() - CLOCK_MARGIN_SECS;
                    let version = Version::from_u64((read_secs.max(0) as u64) << DDB_SHIFT);
                    let commit_time = chrono::DateTime::from_timestamp(read_secs, 0);
                    let page = self
                        .client
                        .scan()
                        .table_name(&self.table)
                        .segment(seg as i32)
                        .total_segments(self.segments as i32)
                        .limit(self.page_size)
                        .consistent_read(true)
                        .set_exclusive_start_key(exclusive)
                        .send()
                        .await
                        .map_err(|e| {
                            format!("Scan {} segment {seg}: {}", self.table, crate::sink::search::aws_error_text(&e))
                        })?;
                    let n = page.items().len();
                    let raw_keys: Vec<HashMap<String, AttributeValue>> = page
                        .items()
                        .iter()
                        .map(|item| {
                            item.iter().filter(|(k, _)| key_names.contains(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
                        })
                        .collect();
                    let page_read = std::time::Instant::now();
                    let rows: Vec<(Row, Row)> = page
                        .items()
                        .iter()
                        .map(|item| {
                            let row = super::decode::scanned_image(item);
                            let key: Row = key_names
                                .iter()
                                .filter_map(|k| row.get(k).map(|v| (Name::from(k.as_str()), v.clone())))
                                .collect();
                            (key, row)
                        })
                        .collect();
                    let page_keys: Vec<Row> = rows.iter().map(|(k, _)| k.clone()).collect();
                    self.fence.register(page_keys.iter().cloned(), read_secs);
                    let mut superseded = 0usize;
                    for (i, ((key, row), raw_key)) in rows.into_iter().zip(raw_keys).enumerate() {
                        let mut read_at = page_read;
                        let mut change = Change {
                            source: Arc::clone(&self.source),
                            relation: Arc::clone(&self.relation),
                            op: Op::Read,
                            key,
                            before: None,
                            after: Some(row),
                            unchanged: Vec::new(),
                            position: Position::Snapshot { at: version, chunk: i as u64 },
                            version,
                            commit_time,
                            tx: None,
                            origin: Some(Arc::clone(&origin)),
                            key_changed: false,
                        };
                        loop {
                            // A row that has waited (for room, or behind earlier rows of its
                            // page) is read again just before it is handed over.
                            if read_at.elapsed() >= self.recheck_after {
                                read_at = std::time::Instant::now();
                                match self.reread(&raw_key, change).await? {
                                    Some(fresh) => change = fresh,
                                    None => {
                                        superseded += 1;
                                        break;
                                    }
                                }
                            }
                            match self.fence.offer(&*window, change) {
                                Ok(super::scan_fence::Offered::Sent) => break,
                                Ok(super::scan_fence::Offered::Superseded) => {
                                    superseded += 1;
                                    break;
                                }
                                Err(crate::source::SendError::Full(c)) => {
                                    let closed = tokio::select! {
                                        r = window.room(&c) => r.is_err(),
                                        _ = self.cancel.cancelled() => true,
                                    };
                                    if closed {
                                        self.fence.forget(page_keys);
                                        return Ok(());
                                    }
                                    change = *c;
                                }
                                Err(crate::source::SendError::Closed) => {
                                    self.fence.forget(page_keys);
                                    return Ok(());
                                }
                            }
                        }
                    }
                    if superseded > 0 {
                        tracing::debug!(source = %self.source, segment = seg, rows = superseded, "scan rows dropped: the stream delivered a newer record of their items while they waited");
                    }
                    // The page is applied everywhere before its end is recorded.
                    while window.in_flight() > 0 {
                        tokio::select! {
                            _ = self.cancel.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                        }
                    }
                    rows_metric.inc_by(n as u64);
                    let next = page.last_evaluated_key().map(key_to_json).unwrap_or_else(|| SEGMENT_DONE.to_string());
                    shared.lock().unwrap_or_else(|p| p.into_inner())[seg] = next.clone();
                    // Only this segment's key: segments record concurrently.
                    progress
                        .update(&task.id, |t| {
                            if let Some(k) = t.last_key.as_mut().filter(|k| k.len() > seg) {
                                k[seg] = next;
                            }
                            t.rows += n as u64;
                            t.chunks += 1;
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                }
            });
        }
        for r in futures::future::join_all(futs).await {
            r?;
        }
        if self.cancel.is_cancelled() {
            return Ok(());
        }
        progress.update(&task.id, |t| t.state = TaskState::Done).await.map_err(|e| e.to_string())?;
        tracing::info!(source = %self.source, pipeline = %task.pipeline, "backfill finished");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_keys_round_trip() {
        let mut k = HashMap::new();
        k.insert("user_id".to_string(), AttributeValue::S("u,1\"".into()));
        k.insert("n".to_string(), AttributeValue::N("12345678901234567890123456789012345678".into()));
        k.insert("b".to_string(), AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(vec![0u8, 255])));
        assert_eq!(key_from_json(&key_to_json(&k)), Some(k));
    }
}
