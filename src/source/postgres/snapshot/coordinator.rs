//! The stream's side of the snapshots: which chunk windows are open, the keys the stream
//! changed inside them, and what each watermark message releases at its position.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::Signal;
use crate::change::{Change, Name, Op, Row};

/// Most keys a window records before its chunk is read again instead.
const WINDOW_KEY_CAP: usize = 200_000;

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
    pub(super) wake: Notify,
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

    pub(super) fn take_rereads(&self) -> Vec<Reread> {
        self.rereads.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }

    pub(super) fn take_signals(&self) -> Vec<Signal> {
        self.signals.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }

    /// A chunk is about to write its low watermark.
    pub(super) fn expect(&self, id: u64) {
        self.lock().expected.insert(id);
    }

    /// A task is about to write a clear mark.
    pub(super) fn expect_clear(&self, id: u64, relation: Name, pipeline: Name) {
        self.lock().clears.insert(id, (relation, pipeline));
    }

    pub(super) fn put_chunk(&self, id: u64, relation: Name, pipeline: Name, rows: Vec<(Row, Row)>) {
        self.lock().chunks.insert(id, Chunk { relation, pipeline, rows, outcome: None, commit_end: None });
    }

    /// The chunk's outcome and the end LSN of its high watermark's transaction, once both
    /// are known.
    pub(super) fn outcome(&self, id: u64) -> Option<(Option<usize>, u64)> {
        let st = self.lock();
        let c = st.chunks.get(&id)?;
        Some((c.outcome?, c.commit_end?))
    }

    pub(super) fn drop_chunk(&self, id: u64) {
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
pub(super) struct ChunkGuard<'a>(pub(super) &'a Coordinator, pub(super) u64);

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        self.0.drop_chunk(self.1);
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
