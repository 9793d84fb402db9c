//! One snapshot task, chunk by chunk: low watermark, settle, read, hand the rows to the
//! coordinator, high watermark; a chunk's last key is recorded once the slot confirms past its
//! high watermark's transaction.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::PREFIX;
use super::coordinator::ChunkGuard;
use super::table_shape::{literal, quote_ident, shape, text_rows};
use crate::change::{Name, Row};
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::coordinator::Coordinator;
use crate::checkpoint::snapshot::{ProgressStore, SnapshotTask, TaskState};
use crate::source::postgres::SnapshotPipelines;
use crate::source::postgres::config::{ConnInfo, SnapshotSettings};
use crate::source::postgres::setup::Catalog;
use crate::source::postgres::setup::{self, quote_relation};
use crate::telemetry::metrics;

/// What every snapshot task of one source shares: the manager's settings, the progress
/// store and the source's rate budget.
pub(super) struct TaskContext {
    pub(super) source: Name,
    pub(super) info: ConnInfo,
    pub(super) catalog: Arc<ArcSwap<Catalog>>,
    pub(super) settings: SnapshotSettings,
    pub(super) pipelines: SnapshotPipelines,
    pub(super) partition: Arc<dyn crate::source::Partition>,
    pub(super) coordinator: Arc<Coordinator>,
    pub(super) cancel: CancellationToken,
    pub(super) progress: ProgressStore,
    pub(super) rate: Option<std::sync::Mutex<(Instant, u64)>>,
}

impl TaskContext {
    /// Change one task and record it (a task that cannot record its progress stops).
    pub(super) async fn update(&self, id: &str, f: impl FnOnce(&mut SnapshotTask)) -> Result<(), String> {
        self.progress.update(id, f).await.map_err(|e| e.to_string())
    }
}

/// Read one task to its end (or until cancelled), chunk by chunk.
pub(super) async fn run_task(shared: &TaskContext, id: &str) -> Result<(), String> {
    let m = shared;
    let task = shared.progress.task(id).ok_or("task vanished")?;
    if m.catalog.load().server_version < 140000 {
        return Err("snapshots need PostgreSQL 14 or later (pgoutput's messages option carries the watermarks)".into());
    }
    let client = setup::connect_sql(&m.info, &m.source).await.map_err(|e| e.to_string())?;
    let catalog = m.catalog.load_full();
    let shape = shape(&client, &catalog, &task.relation).await?;
    let chunk_size = m.settings.chunk_size();
    let estimate: Option<i64> = client
        .query_one(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = $1::text::regclass",
            &[&quote_relation(&task.relation)],
        )
        .await
        .ok()
        .map(|r| r.get(0));
    let estimate = estimate.filter(|e| *e >= 0).map(|e| e as u64);
    // Plain column references: the simple-query protocol returns each value through its
    // type's output function, the same text pgoutput sends (a `::text` cast would not be: it
    // prints booleans as `true` and trims `char(n)`).
    let select_list: Vec<String> = shape.columns.iter().map(|c| format!("t.{}", quote_ident(&c.0))).collect();
    // Qualified: ORDER BY "id" could otherwise bind to an output column of the same name.
    let key_list: Vec<String> =
        shape.page_key.iter().map(|&i| format!("t.{}", quote_ident(&shape.columns[i].0))).collect();
    let filter = task.filter.as_ref().map(|f| format!(" AND ({f})")).unwrap_or_default();
    let chunk_sql = |after: Option<&Vec<String>>, limit: usize| {
        let from = match after {
            None => "true".to_string(),
            Some(k) => {
                let lits: Vec<String> =
                    shape.page_key.iter().zip(k).map(|(&i, text)| literal(text, &shape.columns[i].2)).collect();
                format!("({}) > ({})", key_list.join(", "), lits.join(", "))
            }
        };
        format!(
            "SELECT {} FROM {} AS t WHERE {from}{filter} ORDER BY {} LIMIT {limit}",
            select_list.join(", "),
            quote_relation(&task.relation),
            key_list.join(", ")
        )
    };
    // Check the query (and the --where condition) once before the first watermark.
    client
        .simple_query(&chunk_sql(None, 0))
        .await
        .map_err(|e| format!("{}: {}", task.relation, setup::pg_error_text(&e)))?;
    shared
        .update(id, |t| {
            t.state = TaskState::Running;
            t.estimate = estimate;
        })
        .await?;
    if let Some(k) = &task.last_key {
        tracing::info!(source = %m.source, table = %task.relation, pipeline = %task.pipeline, after_key = ?k, rows = task.rows, "resuming snapshot after the last applied chunk");
    }
    let rows_metric = metrics().snapshot_rows.with_label_values(&[&*m.source, task.relation.as_str()]);
    let remaining = metrics().snapshot_chunks_remaining.with_label_values(&[&*m.source, task.relation.as_str()]);
    let mut last_key = task.last_key.clone();
    let mut done_rows = task.rows;
    let relation = Name::from(task.relation.as_str());
    let pipeline = Name::from(task.pipeline.as_str());
    let mut long_running: HashMap<String, Instant> = HashMap::new();
    if task.clear_first && task.last_key.is_none() {
        let id: u64 = rand::random::<u64>() >> 1;
        m.coordinator.expect_clear(id, Arc::clone(&relation), Arc::clone(&pipeline));
        client
            .execute(
                "SELECT pg_logical_emit_message(true, $1, $2)",
                &[&PREFIX, &format!("clear {id} {}", task.relation)],
            )
            .await
            .map_err(|e| setup::pg_error_text(&e))?;
        tracing::info!(source = %m.source, table = %task.relation, pipeline = %task.pipeline, "clearing the table in the pipeline's sinks before reading it again");
    }
    // Chunks read but not yet confirmed, oldest first: reading the next chunk overlaps with
    // applying the previous ones, up to `chunks_in_flight` (memory: that many chunks).
    let max_in_flight = m.settings.chunks_in_flight();
    let mut in_flight: VecDeque<InFlightChunk<'_>> = VecDeque::new();
    // Where the next read starts (ahead of `last_key`, the last applied chunk's end).
    let mut read_from = last_key.clone();
    let mut reading_done = false;
    loop {
        if m.cancel.is_cancelled() {
            return Ok(());
        }
        if !reading_done && in_flight.len() < max_in_flight {
            let chunk_id: u64 = rand::random::<u64>() >> 1;
            m.coordinator.expect(chunk_id);
            let guard = ChunkGuard(&m.coordinator, chunk_id);
            let emit = |kind: &str| format!("{kind} {chunk_id} {}", task.relation);
            client
                .execute("SELECT pg_logical_emit_message(true, $1, $2)", &[&PREFIX, &emit("low")])
                .await
                .map_err(|e| setup::pg_error_text(&e))?;
            settle(&client, &mut long_running).await?;
            let rows = text_rows(&client, &chunk_sql(read_from.as_ref(), chunk_size))
                .await
                .map_err(|e| format!("{}: {}", task.relation, setup::pg_error_text(&e)))?;
            let n = rows.len();
            let mut chunk_rows = Vec::with_capacity(n);
            let mut new_last = read_from.clone();
            for texts in &rows {
                let mut row = Row::with_capacity(shape.columns.len());
                for (c, t) in shape.columns.iter().zip(texts) {
                    let v = match t {
                        Some(t) => c.1.decode(t.as_bytes()),
                        None => crate::change::Value::Null,
                    };
                    row.push(Arc::clone(&c.0), v);
                }
                let key: Row = shape
                    .key
                    .iter()
                    .map(|&i| {
                        (
                            Arc::clone(&shape.columns[i].0),
                            row.iter().nth(i).map(|(_, v)| v.clone()).unwrap_or(crate::change::Value::Null),
                        )
                    })
                    .collect();
                new_last = Some(shape.page_key.iter().map(|&i| texts[i].clone().unwrap_or_default()).collect());
                chunk_rows.push((key, row));
            }
            m.coordinator.put_chunk(chunk_id, Arc::clone(&relation), Arc::clone(&pipeline), chunk_rows);
            client
                .execute("SELECT pg_logical_emit_message(true, $1, $2)", &[&PREFIX, &emit("high")])
                .await
                .map_err(|e| setup::pg_error_text(&e))?;
            let start = read_from.clone();
            read_from = new_last.clone();
            reading_done = n < chunk_size;
            in_flight.push_back(InFlightChunk { id: chunk_id, start, end: new_last, rows: n, _guard: guard });
            // Rate limit across this source's snapshots.
            if let (Some(limit), Some(rate)) = (m.settings.max_rows_per_second, &shared.rate) {
                let wait = {
                    let mut r = rate.lock().unwrap_or_else(|p| p.into_inner());
                    r.1 += n as u64;
                    let due = Duration::from_secs_f64(r.1 as f64 / limit.max(1) as f64);
                    due.saturating_sub(r.0.elapsed())
                };
                tokio::select! {
                    _ = m.cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            if !reading_done && in_flight.len() < max_in_flight {
                continue;
            }
        }
        // Wait for the oldest chunk: applied everywhere once the confirmed position reaches the
        // end of the transaction that carried its high watermark.
        let Some(front) = in_flight.front() else {
            tracing::info!(source = %m.source, table = %task.relation, pipeline = %task.pipeline, rows = done_rows, "snapshot finished");
            shared.update(id, |t| t.state = TaskState::Done).await?;
            return Ok(());
        };
        let outcome = loop {
            if let Some((o, commit_end)) = m.coordinator.outcome(front.id)
                && m.partition.confirmed() >= commit_end
            {
                break o;
            }
            tokio::select! {
                _ = m.cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        };
        let Some(emitted) = outcome else {
            // The window saw a truncate or too many changes: read again from this chunk's
            // start (later chunks in flight are dropped and read again too).
            tracing::debug!(source = %m.source, table = %task.relation, "chunk window saw a truncate or too many changes; reading it again");
            read_from = front.start.clone();
            in_flight.clear();
            reading_done = false;
            continue;
        };
        let done = in_flight.pop_front().expect("front exists");
        rows_metric.inc_by(emitted as u64);
        done_rows += done.rows as u64;
        last_key = done.end.clone();
        let finished = reading_done && in_flight.is_empty();
        if let Some(e) = estimate {
            remaining.set(if finished {
                0
            } else {
                (e.saturating_sub(done_rows) as usize).div_ceil(chunk_size) as i64
            });
        }
        shared
            .update(id, |t| {
                t.last_key = last_key.clone();
                t.rows = done_rows;
                t.chunks += 1;
            })
            .await?;
    }
}

/// A chunk read and handed to the stream, not yet confirmed.
struct InFlightChunk<'a> {
    id: u64,
    start: Option<Vec<String>>,
    end: Option<Vec<String>>,
    rows: usize,
    _guard: ChunkGuard<'a>,
}

/// How long a transaction the commit log still calls in progress may be in the gap between
/// writing its commit record and marking itself committed (an fsync, or a synchronous-commit
/// flush). Past this, it is taken to be a genuinely open transaction, which commits after the
/// low watermark and is therefore covered by the window.
const COMMIT_GAP_GRACE: Duration = Duration::from_millis(500);

/// Wait until every transaction whose commit record precedes the low watermark is visible to
/// a new snapshot. PostgreSQL writes a commit record before the transaction leaves the
/// process array, so for a moment (longer with synchronous replication) a transaction can be
/// committed in the WAL, before the watermark, and still invisible to the chunk's read; its
/// change would sit before the window while the chunk held the older row. Transactions open at
/// the watermark are waited for while the commit log says they finished (they are in that
/// gap), or briefly while it says they are in progress (they may be inside the fsync); ones
/// open for longer are remembered and not waited for again.
async fn settle(client: &tokio_postgres::Client, long_running: &mut HashMap<String, Instant>) -> Result<(), String> {
    let q = "SELECT x::text, coalesce(pg_xact_status(x), 'unknown') FROM pg_snapshot_xip(pg_current_snapshot()) AS x";
    let rows = client.query(q, &[]).await.map_err(|e| setup::pg_error_text(&e))?;
    let mut watch: HashSet<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    let started = Instant::now();
    loop {
        if watch.is_empty() {
            return Ok(());
        }
        let now: Vec<(String, String)> = client
            .query(q, &[])
            .await
            .map_err(|e| setup::pg_error_text(&e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let still: HashSet<String> = now.iter().map(|(x, _)| x.clone()).collect();
        watch.retain(|x| still.contains(x));
        long_running.retain(|x, _| still.contains(x));
        let mut waiting = false;
        for (x, status) in now.iter().filter(|(x, _)| watch.contains(x)) {
            if status != "in progress" {
                waiting = true; // committed or aborted, not yet visible: the gap
            } else {
                let first = *long_running.entry(x.clone()).or_insert_with(Instant::now);
                if first.elapsed() < COMMIT_GAP_GRACE {
                    waiting = true;
                }
            }
        }
        if !waiting {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err("transactions stayed committed-but-invisible for 60 s (a stuck synchronous standby?)".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
