//! Snapshots and backfills while the stream flows: chunks read by primary key between two
//! watermarks written into the WAL (the DBLog method), so rows and live changes interleave
//! correctly without locks and without pausing the stream.
//!
//! For each chunk a worker:
//! 1. writes a *low* watermark (`pg_logical_emit_message(true, 'polysync.snapshot', 'low …')`);
//! 2. reads the next chunk (`WHERE (pk) > (last) ORDER BY pk LIMIT n`) and hands it to the
//!    [`Coordinator`];
//! 3. writes a *high* watermark and waits until the slot's confirmed position passes it.
//!
//! The stream, reading in WAL order, records the keys of every change to the table between the
//! low and the high watermark (those rows may be older in the chunk than in the stream) and, at
//! the high watermark, emits the chunk's other rows as `read` changes versioned with the high
//! watermark's commit LSN, at that point of the stream: a later change to the row is newer, an
//! earlier one was visible to the chunk's read. The worker records the chunk's last key only
//! once the slot confirms past the high watermark, i.e. when every sink applied the rows; a
//! crash resumes at that key. Memory is one chunk per running table, plus the keys changed
//! during a window (capped: a window that sees more is read again).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::config::{ConnInfo, SnapshotSettings};
use super::setup::{self, Catalog, quote_relation};
use super::types::text_to_value;
use crate::change::{Change, Name, Op, Row};
use crate::checkpoint::AckWindow;
use crate::checkpoint::snapshot::{SnapshotProgress, SnapshotTask, TaskState, progress_path};
use crate::pipeline::matcher::RelationPattern;
use crate::telemetry::metrics;

/// Logical-message prefix of the watermarks.
pub const PREFIX: &str = "polysync.snapshot";

/// Most keys a window records before its chunk is read again instead.
const WINDOW_KEY_CAP: usize = 200_000;

/// A snapshot request read from the signal table.
#[derive(Debug, Clone)]
pub struct Signal {
    /// Signal row id.
    pub id: i64,
    /// Pipeline to feed.
    pub pipeline: String,
    /// One table, or every table of the pipeline.
    pub relation: Option<String>,
    /// Extra SQL condition.
    pub filter: Option<String>,
}

struct Window {
    relation: Name,
    seen: HashSet<String>,
    reread: bool,
}

struct Chunk {
    relation: Name,
    pipeline: Name,
    rows: Vec<(Row, Row)>,
    /// Set by the stream at the high watermark: rows emitted, or `None` to read again.
    outcome: Option<Option<usize>>,
}

#[derive(Default)]
struct State {
    windows: HashMap<u64, Window>,
    chunks: HashMap<u64, Chunk>,
}

/// Shared between the stream session (which sees watermarks and changes in WAL order) and the
/// snapshot workers (which read chunks).
#[derive(Default)]
pub struct Coordinator {
    state: Mutex<State>,
    open: AtomicUsize,
    signals: Mutex<VecDeque<Signal>>,
    wake: Notify,
}

/// A snapshot row the stream emits at a high watermark.
pub struct ReadRow {
    /// Relation.
    pub relation: Name,
    /// Pipeline that asked.
    pub pipeline: Name,
    /// Primary key.
    pub key: Row,
    /// The row.
    pub row: Row,
}

impl Coordinator {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A watermark message; returns the chunk's rows at a high watermark.
    pub fn on_message(&self, content: &[u8]) -> Vec<ReadRow> {
        let text = String::from_utf8_lossy(content);
        let mut parts = text.splitn(3, ' ');
        let (kind, id) = (parts.next(), parts.next().and_then(|i| i.parse::<u64>().ok()));
        let Some(id) = id else { return Vec::new() };
        let mut st = self.lock();
        match kind {
            Some("low") => {
                let relation = Name::from(parts.next().unwrap_or_default());
                if st.windows.insert(id, Window { relation, seen: HashSet::new(), reread: false }).is_none() {
                    self.open.fetch_add(1, Ordering::SeqCst);
                }
                Vec::new()
            }
            Some("high") => {
                let window = st.windows.remove(&id);
                if window.is_some() {
                    self.open.fetch_sub(1, Ordering::SeqCst);
                }
                // A high watermark of an earlier process (replayed after a crash) has no chunk.
                let Some(chunk) = st.chunks.get_mut(&id) else { return Vec::new() };
                let Some(window) = window else {
                    chunk.outcome = Some(None);
                    return Vec::new();
                };
                if window.reread {
                    chunk.outcome = Some(None);
                    return Vec::new();
                }
                let out: Vec<ReadRow> = chunk
                    .rows
                    .iter()
                    .filter(|(k, _)| !window.seen.contains(&key_text(k)))
                    .map(|(k, r)| ReadRow {
                        relation: Arc::clone(&chunk.relation),
                        pipeline: Arc::clone(&chunk.pipeline),
                        key: k.clone(),
                        row: r.clone(),
                    })
                    .collect();
                chunk.outcome = Some(Some(out.len()));
                out
            }
            _ => Vec::new(),
        }
    }

    /// A change read from the stream: inside a window on its table, its key is no longer
    /// the chunk's to emit.
    pub fn observe(&self, change: &Change) {
        if self.open.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut st = self.lock();
        for w in st.windows.values_mut().filter(|w| w.relation == change.relation) {
            if change.op == Op::Truncate || w.seen.len() >= WINDOW_KEY_CAP {
                w.reread = true;
                continue;
            }
            w.seen.insert(key_text(&change.key));
            // A key change: the old key's row is gone too.
            if let Some(b) = &change.before {
                let old: Row =
                    change.key.iter().filter_map(|(n, _)| b.get(n).map(|v| (Arc::clone(n), v.clone()))).collect();
                if old.len() == change.key.len() {
                    w.seen.insert(key_text(&old));
                }
            }
        }
    }

    /// A row inserted into the signal table.
    pub fn signal(&self, s: Signal) {
        let mut q = self.signals.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back(s);
        drop(q);
        self.wake.notify_one();
    }

    fn take_signals(&self) -> Vec<Signal> {
        self.signals.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }

    fn put_chunk(&self, id: u64, chunk: Chunk) {
        self.lock().chunks.insert(id, chunk);
    }

    fn outcome(&self, id: u64) -> Option<Option<usize>> {
        self.lock().chunks.get(&id).and_then(|c| c.outcome)
    }

    fn drop_chunk(&self, id: u64) {
        let mut st = self.lock();
        st.chunks.remove(&id);
        // A window whose high watermark was never written (the worker failed or stopped).
        if st.windows.remove(&id).is_some() {
            self.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Forgets a chunk and its window however the worker leaves the chunk.
struct ChunkGuard<'a>(&'a Coordinator, u64);

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        self.0.drop_chunk(self.1);
    }
}

fn key_text(key: &Row) -> String {
    let mut s = String::new();
    for (n, v) in key.iter() {
        s.push_str(n);
        s.push('=');
        s.push_str(&format!("{v:?}"));
        s.push('\u{1f}');
    }
    s
}

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
    /// Pipelines of this source: name, relations, `snapshot = "initial"`.
    pub pipelines: Vec<(Name, Vec<RelationPattern>, bool)>,
    /// The source's acknowledgement window (confirmed position).
    pub window: Arc<AckWindow>,
    /// Shared with the stream.
    pub coordinator: Arc<Coordinator>,
    /// Stop.
    pub cancel: CancellationToken,
}

type Progress = Arc<Mutex<SnapshotProgress>>;

struct Shared {
    m: Manager,
    progress: Progress,
    path: PathBuf,
    rate: Option<Mutex<(Instant, u64)>>,
}

impl Shared {
    fn update(&self, id: &str, f: impl FnOnce(&mut SnapshotTask)) -> Result<(), String> {
        let mut p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = p.get_mut(id) {
            f(t);
            t.updated = chrono::Utc::now();
        }
        p.save(&self.path).map_err(|e| e.to_string())
    }
}

impl Manager {
    /// Run snapshot tasks (initial ones, resumed ones, signalled ones) until cancelled.
    pub async fn run(self) {
        let path = progress_path(&self.state_dir, &self.source);
        let progress = match SnapshotProgress::load(&path) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(source = %self.source, error = %e, "snapshots disabled: cannot read their progress");
                return;
            }
        };
        let rate = self.settings.max_rows_per_second.map(|_| Mutex::new((Instant::now(), 0)));
        let shared = Arc::new(Shared { m: self, progress: Arc::new(Mutex::new(progress)), path, rate });
        let m = &shared.m;
        // Initial snapshots of pipelines that have never had one.
        let published = m.catalog.load().published.clone();
        let signal_table = m.catalog.load().signal_table.clone();
        {
            let mut p = shared.progress.lock().unwrap_or_else(|p| p.into_inner());
            for (name, rels, _) in m.pipelines.iter().filter(|p| p.2) {
                for t in
                    published.iter().filter(|t| rels.iter().any(|r| r.matches(t)) && Some(*t) != signal_table.as_ref())
                {
                    if p.add(SnapshotTask::new(format!("initial:{name}:{t}"), name, t, None)) {
                        tracing::info!(source = %m.source, pipeline = %name, table = %t, "initial snapshot requested");
                    }
                }
            }
            if let Err(e) = p.save(&shared.path) {
                tracing::error!(source = %m.source, error = %e, "snapshots disabled: cannot record their progress");
                return;
            }
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(m.settings.parallelism()));
        let mut running: HashSet<String> = HashSet::new();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            // Signals → tasks.
            for s in m.coordinator.take_signals() {
                let mut p = shared.progress.lock().unwrap_or_else(|p| p.into_inner());
                let Some((_, rels, _)) = m.pipelines.iter().find(|(n, _, _)| **n == *s.pipeline) else {
                    tracing::error!(source = %m.source, signal = s.id, pipeline = %s.pipeline, "snapshot request for a pipeline this source does not feed; ignored");
                    continue;
                };
                let tables: Vec<String> = match &s.relation {
                    Some(t) => {
                        let t = if t.contains('.') { t.clone() } else { format!("public.{t}") };
                        if !rels.iter().any(|r| r.matches(&t)) || !published.contains(&t) {
                            tracing::error!(source = %m.source, signal = s.id, pipeline = %s.pipeline, table = %t, "snapshot request for a table the pipeline does not read (or that is not published); ignored");
                            continue;
                        }
                        vec![t]
                    }
                    None => published
                        .iter()
                        .filter(|t| rels.iter().any(|r| r.matches(t)) && Some(*t) != signal_table.as_ref())
                        .cloned()
                        .collect(),
                };
                for t in tables {
                    if p.add(SnapshotTask::new(format!("signal:{}:{t}", s.id), &s.pipeline, &t, s.filter.clone())) {
                        tracing::info!(source = %m.source, pipeline = %s.pipeline, table = %t, filter = ?s.filter, "snapshot requested");
                    }
                }
                let _ = p.save(&shared.path);
            }
            // Start what is pending (or was interrupted).
            let todo: Vec<String> = shared
                .progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .tasks
                .iter()
                .filter(|t| matches!(t.state, TaskState::Pending | TaskState::Running) && !running.contains(&t.id))
                .map(|t| t.id.clone())
                .collect();
            for id in todo {
                running.insert(id.clone());
                let (shared, slots) = (Arc::clone(&shared), Arc::clone(&slots));
                tasks.spawn(async move {
                    let _permit = slots.acquire_owned().await;
                    let r = run_task(&shared, &id).await;
                    (id, r)
                });
            }
            tokio::select! {
                _ = m.cancel.cancelled() => break,
                _ = m.coordinator.wake.notified() => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok((id, r)) = done {
                        running.remove(&id);
                        if let Err(msg) = r {
                            tracing::error!(source = %m.source, task = %id, error = %msg, "snapshot failed");
                            let _ = shared.update(&id, |t| { t.state = TaskState::Failed; t.error = Some(msg); });
                        }
                    }
                }
            }
        }
        tasks.abort_all();
    }
}

struct TableShape {
    columns: Vec<(Name, u32, Arc<str>, String)>,
    key: Vec<usize>,
}

async fn shape(client: &tokio_postgres::Client, catalog: &Catalog, relation: &str) -> Result<TableShape, String> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::oid, format_type(a.atttypid, a.atttypmod), t.typname::text, n.nspname::text \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace n ON n.oid = t.typnamespace \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&quote_relation(relation)],
        )
        .await
        .map_err(|e| setup::pg_error_text(&e))?;
    let columns: Vec<(Name, u32, Arc<str>, String)> = rows
        .iter()
        .map(|r| {
            let (name, oid, sql_type, typname, ns): (String, u32, String, String, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            let type_name: Arc<str> =
                catalog.type_names.get(&oid).map(|s| Arc::from(s.as_str())).unwrap_or_else(|| {
                    if ns == "pg_catalog" || ns == "public" {
                        Arc::from(typname)
                    } else {
                        Arc::from(format!("{ns}.{typname}"))
                    }
                });
            (Name::from(name), oid, type_name, sql_type)
        })
        .collect();
    let pk = catalog.primary_keys.get(relation).ok_or_else(|| {
        format!(
            "table {relation} has no primary key: snapshots read in primary-key order, chunk by chunk; add a primary key (a table with only REPLICA IDENTITY FULL cannot be snapshotted)"
        )
    })?;
    let key = pk
        .iter()
        .map(|k| columns.iter().position(|c| &*c.0 == k).ok_or_else(|| format!("{relation}: key column {k} not found")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TableShape { columns, key })
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

async fn run_task(shared: &Shared, id: &str) -> Result<(), String> {
    let m = &shared.m;
    let task = shared.progress.lock().unwrap_or_else(|p| p.into_inner()).get_mut(id).cloned().ok_or("task vanished")?;
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
    let select_list: Vec<String> = shape.columns.iter().map(|c| format!("t.{}::text", quote_ident(&c.0))).collect();
    // Qualified: ORDER BY "id" would sort by the text output column of the same name.
    let key_list: Vec<String> = shape.key.iter().map(|&i| format!("t.{}", quote_ident(&shape.columns[i].0))).collect();
    let key_params: Vec<String> =
        shape.key.iter().enumerate().map(|(n, &i)| format!("${}::text::{}", n + 1, shape.columns[i].3)).collect();
    let filter = task.filter.as_ref().map(|f| format!(" AND ({f})")).unwrap_or_default();
    let first = format!(
        "SELECT {} FROM {} AS t WHERE true{filter} ORDER BY {} LIMIT {chunk_size}",
        select_list.join(", "),
        quote_relation(&task.relation),
        key_list.join(", ")
    );
    let next = format!(
        "SELECT {} FROM {} AS t WHERE ({}) > ({}){filter} ORDER BY {} LIMIT {chunk_size}",
        select_list.join(", "),
        quote_relation(&task.relation),
        key_list.join(", "),
        key_params.join(", "),
        key_list.join(", ")
    );
    let (first, next) = (
        client.prepare(&first).await.map_err(|e| format!("{}: {}", task.relation, setup::pg_error_text(&e)))?,
        client.prepare(&next).await.map_err(|e| format!("{}: {}", task.relation, setup::pg_error_text(&e)))?,
    );
    shared.update(id, |t| {
        t.state = TaskState::Running;
        t.estimate = estimate;
    })?;
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
            let guard = ChunkGuard(&m.coordinator, chunk_id);
            let emit = |kind: &str| format!("{kind} {chunk_id} {}", task.relation);
            client
                .execute("SELECT pg_logical_emit_message(true, $1, $2)", &[&PREFIX, &emit("low")])
                .await
                .map_err(|e| setup::pg_error_text(&e))?;
            settle(&client, &mut long_running).await?;
            let rows = match &read_from {
                None => client.query(&first, &[]).await,
                Some(k) => {
                    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                        k.iter().map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
                    client.query(&next, &params).await
                }
            }
            .map_err(|e| format!("{}: {}", task.relation, setup::pg_error_text(&e)))?;
            let n = rows.len();
            let mut chunk_rows = Vec::with_capacity(n);
            let mut new_last = read_from.clone();
            for r in &rows {
                let mut row = Row::with_capacity(shape.columns.len());
                let mut texts: Vec<Option<String>> = Vec::with_capacity(shape.columns.len());
                for (i, c) in shape.columns.iter().enumerate() {
                    let t: Option<String> = r.get(i);
                    let v = match &t {
                        Some(t) => text_to_value(c.1, &c.2, t.as_bytes()),
                        None => crate::change::Value::Null,
                    };
                    row.push(Arc::clone(&c.0), v);
                    texts.push(t);
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
                new_last = Some(shape.key.iter().map(|&i| texts[i].clone().unwrap_or_default()).collect());
                chunk_rows.push((key, row));
            }
            m.coordinator.put_chunk(
                chunk_id,
                Chunk {
                    relation: Arc::clone(&relation),
                    pipeline: Arc::clone(&pipeline),
                    rows: chunk_rows,
                    outcome: None,
                },
            );
            let high: String = client
                .query_one("SELECT pg_logical_emit_message(true, $1, $2)::text", &[&PREFIX, &emit("high")])
                .await
                .map_err(|e| setup::pg_error_text(&e))?
                .get(0);
            let high: u64 = high.parse::<crate::change::Lsn>().map(|l| l.0).map_err(|_| format!("bad LSN {high}"))?;
            let start = read_from.clone();
            read_from = new_last.clone();
            reading_done = n < chunk_size;
            in_flight.push_back(InFlightChunk { id: chunk_id, high, start, end: new_last, rows: n, _guard: guard });
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
        // Wait for the oldest chunk: applied everywhere once the slot's confirmed position
        // passes its high watermark.
        let Some(front) = in_flight.front() else {
            tracing::info!(source = %m.source, table = %task.relation, pipeline = %task.pipeline, rows = done_rows, "snapshot finished");
            shared.update(id, |t| t.state = TaskState::Done)?;
            return Ok(());
        };
        let outcome = loop {
            if m.window.confirmed() > front.high
                && let Some(o) = m.coordinator.outcome(front.id)
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
        shared.update(id, |t| {
            t.last_key = last_key.clone();
            t.rows = done_rows;
            t.chunks += 1;
        })?;
    }
}

/// A chunk read and handed to the stream, not yet confirmed.
struct InFlightChunk<'a> {
    id: u64,
    high: u64,
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

/// Why `polysync snapshot` could not file a request.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

/// File a snapshot request: a row in a PostgreSQL source's signal table, or a request file for
/// a DynamoDB source. Returns the source name and the request id (progress tasks are
/// `signal:<id>:<table>`).
pub async fn request(
    config: &crate::config::Config,
    pipeline: &str,
    table: Option<&str>,
    filter: Option<&str>,
) -> Result<(String, String), RequestError> {
    let pipelines = crate::app::check(config).map_err(|e| RequestError(e.to_string()))?;
    let p = pipelines
        .iter()
        .find(|p| &*p.name == pipeline)
        .ok_or_else(|| RequestError(format!("no pipeline named {pipeline:?} in {}", config.pipelines_dir.display())))?;
    let Some(crate::source::SourceConfig::Postgres(pg)) = config.sources.get(&*p.source) else {
        return Err(RequestError(format!(
            "pipeline {pipeline:?} reads source {:?}, which is not PostgreSQL",
            p.source
        )));
    };
    if let Some(t) = table {
        let t = if t.contains('.') { t.to_string() } else { format!("public.{t}") };
        if !p.matches_relation(&t) {
            return Err(RequestError(format!("pipeline {pipeline:?} does not read {t}")));
        }
    }
    let signal = pg.signal_table().ok_or_else(|| {
        RequestError(format!("source {:?} has signal_table = \"\" (on-demand snapshots are off)", p.source))
    })?;
    let info = pg.validate(&p.source).map_err(|e| RequestError(e.to_string()))?;
    let client = setup::connect_sql(&info, &p.source).await.map_err(|e| RequestError(e.to_string()))?;
    let row = client
        .query_one(
            &format!("INSERT INTO {} (pipeline, relation, filter) VALUES ($1, $2, $3) RETURNING id", quote_relation(&signal)),
            &[&pipeline, &table, &filter],
        )
        .await
        .map_err(|e| {
            RequestError(format!(
                "cannot insert into the signal table {signal}: {} (the daemon creates it with create_if_missing; otherwise: {} and add it to the publication)",
                setup::pg_error_text(&e),
                setup::signal_table_ddl(&signal)
            ))
        })?;
    Ok((p.source.to_string(), row.get::<_, i64>(0).to_string()))
}
