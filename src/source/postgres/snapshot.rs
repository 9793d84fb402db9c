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
use super::types::ColumnType;
use crate::change::{Change, Name, Op, Row};
use crate::checkpoint::snapshot::{SnapshotProgress, SnapshotTask, TaskState, progress_path};
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
    /// End LSN of the transaction that carried the high watermark, set at its Commit. Only a
    /// confirmed position at or past it proves the emitted rows were applied: the watermark
    /// message's own LSN is earlier, and a concurrent commit or a keepalive can be confirmed
    /// past it before the rows even hold a ticket.
    commit_end: Option<u64>,
}

#[derive(Default)]
struct State {
    /// Chunks of this process whose low watermark is written or about to be: a low watermark
    /// opens a window only for them, so one of an earlier process, or of a chunk abandoned
    /// before the stream reached it, never opens a window that no high watermark closes.
    expected: HashSet<u64>,
    windows: HashMap<u64, Window>,
    chunks: HashMap<u64, Chunk>,
    /// Chunks whose high watermark is in the transaction being decoded.
    awaiting_commit: Vec<u64>,
    /// Clear marks this process wrote: id → (relation, pipeline).
    clears: HashMap<u64, (Name, Name)>,
}

/// Shared between the stream session (which sees watermarks and changes in WAL order) and the
/// snapshot workers (which read chunks).
#[derive(Default)]
pub struct Coordinator {
    state: Mutex<State>,
    open: AtomicUsize,
    signals: Mutex<VecDeque<Signal>>,
    rereads: Mutex<VecDeque<Reread>>,
    wake: Notify,
}

/// A table to read again through every pipeline that reads it (its columns changed).
pub struct Reread {
    /// `schema.table`.
    pub relation: String,
    /// Run once the tasks are saved (records the table's new shape).
    pub queued: Box<dyn FnOnce() + Send>,
}

/// What a watermark message releases into the stream at its position.
pub enum Released {
    /// Nothing.
    Nothing,
    /// A chunk's rows (at its high watermark).
    Rows(Vec<ReadRow>),
    /// Clear `relation` in `pipeline`'s sinks (before the first chunk of a re-read).
    Clear {
        /// Relation.
        relation: Name,
        /// Pipeline.
        pipeline: Name,
    },
}

impl Released {
    /// The rows released, if any.
    pub fn into_rows(self) -> Vec<ReadRow> {
        match self {
            Released::Rows(r) => r,
            _ => Vec::new(),
        }
    }
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

    /// A watermark message: a chunk's rows at its high watermark, a clear at a clear mark.
    pub fn on_message(&self, content: &[u8]) -> Released {
        let text = String::from_utf8_lossy(content);
        let mut parts = text.splitn(3, ' ');
        let (kind, id) = (parts.next(), parts.next().and_then(|i| i.parse::<u64>().ok()));
        let Some(id) = id else { return Released::Nothing };
        if kind == Some("clear") {
            // Only this process's: a replayed clear of an earlier run was followed by its
            // chunks, or the task starts over with a clear of its own.
            return match self.lock().clears.remove(&id) {
                Some((relation, pipeline)) => Released::Clear { relation, pipeline },
                None => Released::Nothing,
            };
        }
        Released::Rows(self.on_watermark(kind, id, parts.next()))
    }

    fn on_watermark(&self, kind: Option<&str>, id: u64, relation: Option<&str>) -> Vec<ReadRow> {
        let mut st = self.lock();
        match kind {
            Some("low") => {
                if !st.expected.contains(&id) {
                    return Vec::new(); // another process's, or a chunk already abandoned
                }
                let relation = Name::from(relation.unwrap_or_default());
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
                if !st.chunks.contains_key(&id) {
                    return Vec::new();
                }
                st.awaiting_commit.push(id);
                let chunk = st.chunks.get_mut(&id).expect("checked above");
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
                    .filter(|(k, _)| !window.seen.contains(&k.identity()))
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

    /// The Commit of the transaction being decoded, with its end LSN.
    pub fn on_commit(&self, end_lsn: u64) {
        let mut st = self.lock();
        if st.awaiting_commit.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut st.awaiting_commit);
        for id in ids {
            if let Some(c) = st.chunks.get_mut(&id) {
                c.commit_end = Some(end_lsn);
            }
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
            w.seen.insert(change.key.identity());
            // An update whose old image shows another key (a key change the source did not
            // split): the old key's row is gone too.
            if let Some(old) = change.old_key() {
                w.seen.insert(old.identity());
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

    /// Queue a re-read of a table through every pipeline that reads it.
    pub fn reread(&self, r: Reread) {
        self.rereads.lock().unwrap_or_else(|p| p.into_inner()).push_back(r);
        self.wake.notify_one();
    }

    fn take_rereads(&self) -> Vec<Reread> {
        self.rereads.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }

    fn take_signals(&self) -> Vec<Signal> {
        self.signals.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }

    /// A chunk is about to write its low watermark.
    fn expect(&self, id: u64) {
        self.lock().expected.insert(id);
    }

    /// A task is about to write a clear mark.
    fn expect_clear(&self, id: u64, relation: Name, pipeline: Name) {
        self.lock().clears.insert(id, (relation, pipeline));
    }

    fn put_chunk(&self, id: u64, relation: Name, pipeline: Name, rows: Vec<(Row, Row)>) {
        self.lock().chunks.insert(id, Chunk { relation, pipeline, rows, outcome: None, commit_end: None });
    }

    /// The chunk's outcome and the end LSN of its high watermark's transaction, once both
    /// are known.
    fn outcome(&self, id: u64) -> Option<(Option<usize>, u64)> {
        let st = self.lock();
        let c = st.chunks.get(&id)?;
        Some((c.outcome?, c.commit_end?))
    }

    fn drop_chunk(&self, id: u64) {
        let mut st = self.lock();
        st.expected.remove(&id);
        st.chunks.remove(&id);
        st.awaiting_commit.retain(|x| *x != id);
        // A window whose high watermark was never written (the worker failed or stopped).
        if st.windows.remove(&id).is_some() {
            self.open.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[cfg(test)]
    fn open_windows(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Forgets a chunk and its window however the worker leaves the chunk.
struct ChunkGuard<'a>(&'a Coordinator, u64);

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        self.0.drop_chunk(self.1);
    }
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
    /// Pipelines of this source: name, relations, `snapshot = "initial"` (replaced by reloads).
    pub pipelines: super::SnapshotPipelines,
    /// The source's partition (its confirmed position).
    pub partition: Arc<dyn crate::source::Partition>,
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
            for (name, rels, _) in m.pipelines.load().iter().filter(|p| p.2) {
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
        let mut column_retries: HashMap<String, u32> = HashMap::new();
        loop {
            // Signals → tasks.
            for s in m.coordinator.take_signals() {
                let mut p = shared.progress.lock().unwrap_or_else(|p| p.into_inner());
                let pipelines = m.pipelines.load();
                let catalog = m.catalog.load();
                let (published, signal_table) = (&catalog.published, catalog.signal_table.as_ref());
                // A request that cannot be served is recorded as failed, with the reason, so
                // `polysync snapshot --wait` and `status` report the daemon's answer.
                let mut reject = |table: &str, why: String| {
                    tracing::error!(source = %m.source, signal = s.id, pipeline = %s.pipeline, table, reason = %why, "snapshot request rejected");
                    let mut t =
                        SnapshotTask::new(format!("signal:{}:{table}", s.id), &s.pipeline, table, s.filter.clone());
                    t.state = TaskState::Failed;
                    t.error = Some(why);
                    p.add(t);
                };
                let Some((_, rels, _)) = pipelines.iter().find(|(n, _, _)| **n == *s.pipeline) else {
                    reject(
                        s.relation.as_deref().unwrap_or("*"),
                        format!("source {} runs no pipeline named {:?}", m.source, s.pipeline),
                    );
                    let _ = p.save(&shared.path);
                    continue;
                };
                let tables: Vec<String> = match &s.relation {
                    Some(t) => {
                        let t = if t.contains('.') { t.clone() } else { format!("public.{t}") };
                        if !rels.iter().any(|r| r.matches(&t)) {
                            reject(&t, format!("pipeline {} does not read {t}", s.pipeline));
                            let _ = p.save(&shared.path);
                            continue;
                        }
                        if !published.contains(&t) {
                            reject(&t, format!("{t} is not in the publication"));
                            let _ = p.save(&shared.path);
                            continue;
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
                    reject("*", format!("pipeline {} reads no published table", s.pipeline));
                }
                for t in tables {
                    if p.add(SnapshotTask::new(format!("signal:{}:{t}", s.id), &s.pipeline, &t, s.filter.clone())) {
                        tracing::info!(source = %m.source, pipeline = %s.pipeline, table = %t, filter = ?s.filter, "snapshot requested");
                    }
                }
                let _ = p.save(&shared.path);
            }
            // Column changes → a re-read of the table in every pipeline that reads it.
            for r in m.coordinator.take_rereads() {
                let mut p = shared.progress.lock().unwrap_or_else(|p| p.into_inner());
                let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
                for (pipeline, rels, _) in m.pipelines.load().iter() {
                    if rels.iter().any(|x| x.matches(&r.relation))
                        && p.add(SnapshotTask::new(
                            format!("schema:{stamp}:{pipeline}:{}", r.relation),
                            pipeline,
                            &r.relation,
                            None,
                        ))
                    {
                        tracing::info!(source = %m.source, pipeline = %pipeline, table = %r.relation, "re-read queued after a column change");
                    }
                }
                match p.save(&shared.path) {
                    Ok(()) => (r.queued)(),
                    Err(e) => {
                        tracing::error!(source = %m.source, table = %r.relation, error = %e, "could not save the re-read after a column change; it is queued again at the next start")
                    }
                }
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
                        match r {
                            // A column dropped or renamed while the task read the table
                            // (undefined_column): read its shape again and go on from the last
                            // applied chunk, a few times, rather than fail the task.
                            Err(msg) if msg.contains("ERROR 42703") && *column_retries.entry(id.clone()).or_insert(0) < 5 => {
                                *column_retries.entry(id.clone()).or_insert(0) += 1;
                                tracing::warn!(source = %m.source, task = %id, error = %msg, "the table's columns changed while it was read; reading on with its new shape");
                                let _ = shared.update(&id, |t| t.state = TaskState::Pending);
                            }
                            Err(msg) => {
                                tracing::error!(source = %m.source, task = %id, error = %msg, "snapshot failed");
                                let _ = shared.update(&id, |t| { t.state = TaskState::Failed; t.error = Some(msg); });
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

struct TableShape {
    /// Name, how its text is decoded, SQL type for casts.
    columns: Vec<(Name, ColumnType, String)>,
    /// Key columns in the key index's order: what chunks are paged by.
    page_key: Vec<usize>,
    /// Key columns in the table's column order: how key rows are built, as the stream does.
    key: Vec<usize>,
}

async fn shape(client: &tokio_postgres::Client, catalog: &Catalog, relation: &str) -> Result<TableShape, String> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::oid, format_type(a.atttypid, a.atttypmod), t.typname::text, n.nspname::text \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace n ON n.oid = t.typnamespace \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
               AND (a.attgenerated = '' OR (a.attgenerated = 's' AND $2)) \
             ORDER BY a.attnum",
            &[&quote_relation(relation), &catalog.publishes_generated],
        )
        .await
        .map_err(|e| setup::pg_error_text(&e))?;
    let columns: Vec<(Name, ColumnType, String)> = rows
        .iter()
        .map(|r| {
            let (name, oid, sql_type, typname, ns): (String, u32, String, String, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            let type_name: Arc<str> = catalog
                .types
                .name(oid)
                .map(Arc::from)
                .unwrap_or_else(|| Arc::from(super::types::qualified_type_name(&ns, &typname)));
            (Name::from(name), catalog.types.column(oid, type_name), sql_type)
        })
        .collect();
    let key_names = catalog.key_columns.get(relation).ok_or_else(|| {
        format!(
            "table {relation} has no primary key or replica identity index: snapshots read in key order, chunk by chunk; add a primary key"
        )
    })?;
    let page_key = key_names
        .iter()
        .map(|k| columns.iter().position(|c| &*c.0 == k).ok_or_else(|| format!("{relation}: key column {k} not found")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut key = page_key.clone();
    key.sort_unstable();
    Ok(TableShape { columns, page_key, key })
}

/// A SQL literal of `text` cast to `sql_type`, for the simple-query protocol (which has no
/// parameters, but answers in the types' own text output, exactly as pgoutput sends values).
fn literal(text: &str, sql_type: &str) -> String {
    format!("E'{}'::{sql_type}", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The rows of a simple query, each column as the server's text output (`None` for NULL).
async fn text_rows(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for m in client.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            out.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
        }
    }
    Ok(out)
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
            shared.update(id, |t| t.state = TaskState::Done)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Value;

    fn key(id: i64) -> Row {
        [(Name::from("id"), Value::Int(id))].into_iter().collect()
    }

    #[test]
    fn a_low_watermark_opens_a_window_only_for_a_live_chunk() {
        let c = Coordinator::default();
        // Another process's low watermark (replayed after a crash): ignored.
        c.on_message(b"low 7 public.t");
        assert_eq!(c.open_windows(), 0);
        // A chunk abandoned before the stream reached its low watermark.
        c.expect(8);
        c.drop_chunk(8);
        c.on_message(b"low 8 public.t");
        assert_eq!(c.open_windows(), 0, "an abandoned chunk never opens a window");
        // A live chunk opens one, and its high watermark closes it.
        c.expect(9);
        c.on_message(b"low 9 public.t");
        assert_eq!(c.open_windows(), 1);
        c.put_chunk(9, "public.t".into(), "p".into(), vec![(key(1), key(1))]);
        assert_eq!(c.on_message(b"high 9 public.t").into_rows().len(), 1);
        assert_eq!(c.open_windows(), 0);
    }

    #[test]
    fn a_chunk_is_done_only_with_its_watermark_commit() {
        let c = Coordinator::default();
        c.expect(1);
        c.on_message(b"low 1 public.t");
        c.put_chunk(1, "public.t".into(), "p".into(), vec![(key(1), key(1)), (key(2), key(2))]);
        // A change to key 2 inside the window: the stream's version wins.
        let mut ch = Change::test_insert("public.t", key(2), Some(key(2)));
        ch.op = Op::Update;
        c.observe(&ch);
        let rows = c.on_message(b"high 1 public.t").into_rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key, key(1));
        assert!(c.outcome(1).is_none(), "not done before the watermark transaction commits");
        c.on_commit(500);
        assert_eq!(c.outcome(1), Some((Some(1), 500)));
    }

    #[test]
    fn keys_match_whatever_their_type_name() {
        let c = Coordinator::default();
        c.expect(1);
        c.on_message(b"low 1 s.t");
        let snap: Row =
            [(Name::from("k"), Value::Other { type_name: "mood".into(), text: "happy".into() })].into_iter().collect();
        let stream: Row = [(Name::from("k"), Value::Other { type_name: "s.mood".into(), text: "happy".into() })]
            .into_iter()
            .collect();
        c.put_chunk(1, "s.t".into(), "p".into(), vec![(snap.clone(), snap)]);
        let mut ch = Change::test_insert("s.t", stream.clone(), Some(stream));
        ch.op = Op::Update;
        c.observe(&ch);
        assert!(
            c.on_message(b"high 1 s.t").into_rows().is_empty(),
            "the stream's change to the key supersedes the chunk row"
        );
    }
}
