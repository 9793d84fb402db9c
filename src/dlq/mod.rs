//! The dead-letter queue: where a change goes when a pipeline cannot deliver it (a template
//! names a missing field, a value has no form the sink accepts, the sink permanently rejects
//! it), with the pipeline, the sink and the reason, so nothing is dropped silently.
//!
//! Storage is JSONL files in the state directory, one entry per line, rotated at a size and
//! bounded in total. An entry is written and fsynced *before* the change is acknowledged; if
//! it cannot be written (disk full, total bound reached) the caller must not acknowledge, and
//! the lane stalls loudly instead of losing the change.
//!
//! With `[dlq.s3]` the durable record is S3 ([`s3::S3Store`]) and the files are a buffer: an
//! entry is acknowledged only once it is in S3, a file whose entries are all in S3 is removed,
//! and files left by an earlier run are drained to S3 at start.

pub mod config;
pub mod mirror;
pub mod s3;

pub use config::DlqConfig;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::change::Change;
use crate::change::json::{change_from_typed, change_to_typed};

/// Why an entry could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// File-system failure (disk full, permissions).
    #[error("dead-letter queue {}: {source}", dir.display())]
    Io {
        /// DLQ directory.
        dir: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The configured total size is reached.
    #[error("dead-letter queue {} is full ({used} of {limit} bytes); delivery stops until entries are replayed or removed", dir.display())]
    Full {
        /// DLQ directory.
        dir: PathBuf,
        /// Bytes used.
        used: u64,
        /// Configured limit.
        limit: u64,
    },
}

/// One entry as written.
pub struct DeadLetter<'a> {
    /// Pipeline name.
    pub pipeline: &'a str,
    /// Sink target name (or `-` when the failure was before any sink).
    pub sink: &'a str,
    /// Why it could not be delivered.
    pub reason: &'a str,
    /// The change itself.
    pub change: &'a Change,
}

/// One entry as read back.
#[derive(Debug, Clone)]
pub struct StoredDeadLetter {
    /// Unique id (time-ordered), used to mark the entry replayed.
    pub id: String,
    /// When it was written.
    pub at: DateTime<Utc>,
    /// Pipeline name.
    pub pipeline: String,
    /// Sink target.
    pub sink: String,
    /// Reason.
    pub reason: String,
    /// The change.
    pub change: Change,
    /// File it came from.
    pub file: PathBuf,
}

struct Active {
    file: Option<File>,
    index: u64,
    size: u64,
    total: u64,
    /// With a durable store: entries of each file (by index) not yet in it.
    pending: BTreeMap<u64, usize>,
    /// With a durable store: the file each entry not yet in it was written to.
    entry_file: HashMap<String, u64>,
}

/// Writer for the DLQ directory; shared by every lane.
pub struct DeadLetterQueue {
    dir: PathBuf,
    max_file: u64,
    max_total: u64,
    active: Mutex<Active>,
    mirror: Option<tokio::sync::mpsc::Sender<String>>,
    durable: Option<Arc<s3::S3Store>>,
    /// Files below this index were left by an earlier run (drained at start with a store).
    earlier: u64,
}

const PREFIX: &str = "dlq-";
/// Ids of entries delivered by `polysync dlq replay`, one per line (append-only, so replay is
/// safe while the daemon is writing new entries).
pub const REPLAYED: &str = "replayed.ids";
const SUFFIX: &str = ".jsonl";

fn file_name(index: u64) -> String {
    format!("{PREFIX}{index:06}{SUFFIX}")
}

/// DLQ files in a directory, oldest first.
pub fn files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(Ok(i)) = name.strip_prefix(PREFIX).and_then(|r| r.strip_suffix(SUFFIX)).map(str::parse) {
            out.push((i, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Cut a file back to its last complete line (a crash or a full disk can leave half a line);
/// returns the new length.
fn drop_partial_tail(path: &Path) -> std::io::Result<u64> {
    let bytes = std::fs::read(path)?;
    let keep = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(i) => i as u64 + 1,
        None => 0,
    };
    if keep < bytes.len() as u64 {
        tracing::warn!(file = %path.display(), dropped_bytes = bytes.len() as u64 - keep, "dead-letter file ended in a partial line (crash or full disk); cut back to the last complete entry");
        OpenOptions::new().write(true).open(path)?.set_len(keep)?;
    }
    Ok(keep)
}

impl DeadLetterQueue {
    /// Open (creating) the DLQ directory; files are created mode 0600.
    pub fn open(dir: &Path, max_file: u64, max_total: u64) -> Result<DeadLetterQueue, DlqError> {
        let io = |source| DlqError::Io { dir: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let existing = files(dir).map_err(io)?;
        let mut total = 0;
        for (_, p) in &existing {
            total += std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        }
        let (index, size) = match existing.last() {
            Some((i, p)) => (*i, drop_partial_tail(p).map_err(io)?),
            None => (1, 0),
        };
        Ok(DeadLetterQueue {
            dir: dir.to_owned(),
            max_file: max_file.max(4096),
            max_total: max_total.max(4096),
            active: Mutex::new(Active {
                file: None,
                index,
                size,
                total,
                pending: BTreeMap::new(),
                entry_file: HashMap::new(),
            }),
            mirror: None,
            durable: None,
            earlier: 0,
        })
    }

    /// Directory of the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Append an entry durably. Only after `Ok` may the change be acknowledged. Blocking
    /// (fsync): async callers use [`DeadLetterQueue::encode`] and `write_line` on a blocking
    /// thread.
    pub fn write(&self, entry: &DeadLetter<'_>) -> Result<(), DlqError> {
        self.write_line(Self::encode(entry))
    }

    /// The file line of an entry (with its new id and time).
    pub fn encode(entry: &DeadLetter<'_>) -> String {
        let now = Utc::now();
        let id = format!("{}-{:08x}", now.timestamp_micros(), rand::random::<u32>());
        json!({
            "id": id,
            "at": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "pipeline": entry.pipeline,
            "sink": entry.sink,
            "reason": entry.reason,
            "change": change_to_typed(entry.change),
        })
        .to_string()
            + "\n"
    }

    /// Append an encoded entry durably (blocking: fsync).
    pub fn write_line(&self, line: String) -> Result<(), DlqError> {
        let len = line.len() as u64;
        let io = |source| DlqError::Io { dir: self.dir.clone(), source };
        let mut a = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if a.total + len > self.max_total {
            return Err(DlqError::Full { dir: self.dir.clone(), used: a.total, limit: self.max_total });
        }
        if a.size > 0 && a.size + len > self.max_file {
            a.file = None;
            let closed = a.index;
            a.index += 1;
            a.size = 0;
            if self.durable.is_some() && a.pending.get(&closed).is_none_or(|n| *n == 0) && closed >= self.earlier {
                self.remove_file(&mut a, closed);
            }
        }
        if a.file.is_none() {
            let path = self.dir.join(file_name(a.index));
            let mut opts = OpenOptions::new();
            opts.create(true).append(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            a.file = Some(opts.open(&path).map_err(io)?);
        }
        let f = a.file.as_mut().expect("opened above");
        if let Err(e) = f.write_all(line.as_bytes()).and_then(|_| f.sync_data()) {
            // A partial line may be on disk (a full disk): cut the file back to where this
            // entry began, so the next entry starts on a clean line (open() repairs the same
            // after a crash).
            let before = a.size;
            if let Some(f) = a.file.as_mut() {
                let _ = f.set_len(before);
            }
            a.file = None;
            return Err(io(e));
        }
        a.size += len;
        a.total += len;
        if self.durable.is_some()
            && let Some(id) = line_id(&line)
        {
            let index = a.index;
            *a.pending.entry(index).or_default() += 1;
            a.entry_file.insert(id, index);
        }
        drop(a);
        if let Some(m) = &self.mirror
            && m.try_send(line).is_err()
        {
            crate::telemetry::metrics().dlq_mirror_dropped.inc();
        }
        Ok(())
    }

    /// Also send every entry (best effort; the files stay authoritative) to this channel,
    /// drained by the Redis-stream mirror.
    pub fn set_mirror(&mut self, tx: tokio::sync::mpsc::Sender<String>) {
        self.mirror = Some(tx);
    }

    /// Make S3 the durable record (before any entry is written): files of an earlier run are
    /// closed (new entries start a new file) and [`DeadLetterQueue::drain_earlier`] moves them.
    pub fn set_durable(&mut self, store: Arc<s3::S3Store>) {
        let a = self.active.get_mut().unwrap_or_else(|p| p.into_inner());
        if a.size > 0 {
            a.index += 1;
            a.size = 0;
            a.file = None;
        }
        self.earlier = a.index;
        self.durable = Some(store);
    }

    /// The durable store, when dead letters go to S3.
    pub fn durable(&self) -> Option<&Arc<s3::S3Store>> {
        self.durable.as_ref()
    }

    /// The entry `line` is in the durable store: a file none of whose entries wait any more
    /// is removed (the active one once it rotates).
    pub fn stored(&self, line: &str) {
        let Some(id) = line_id(line) else { return };
        let mut a = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let Some(index) = a.entry_file.remove(&id) else { return };
        let left = a.pending.get_mut(&index).map(|n| {
            *n = n.saturating_sub(1);
            *n
        });
        if left == Some(0) && index != a.index {
            self.remove_file(&mut a, index);
        }
    }

    fn remove_file(&self, a: &mut Active, index: u64) {
        a.pending.remove(&index);
        let path = self.dir.join(file_name(index));
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match std::fs::remove_file(&path) {
            Ok(()) => a.total = a.total.saturating_sub(size),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "could not remove a dead-letter file whose entries are all in S3")
            }
        }
    }

    /// With a durable store: put every entry of the files an earlier run left (a crash, or S3
    /// unreachable at the time) and remove those files. Putting an entry twice leaves one
    /// object. Returns how many entries were moved.
    pub async fn drain_earlier(&self) -> Result<usize, s3::S3Error> {
        let Some(store) = &self.durable else { return Ok(0) };
        let earlier: Vec<(u64, PathBuf)> =
            files(&self.dir).unwrap_or_default().into_iter().filter(|(i, _)| *i < self.earlier).collect();
        let mut moved = 0;
        for (index, path) in earlier {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read a dead-letter file to move it to S3");
                    continue;
                }
            };
            let mut unreadable = 0;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                match parse_entry(line, path.clone()) {
                    Ok(_) => {
                        store.put_entry(line).await?;
                        moved += 1;
                    }
                    Err(e) => {
                        unreadable += 1;
                        tracing::warn!(file = %path.display(), error = %e, "an unreadable dead-letter line stays in the local file");
                    }
                }
            }
            // A file with a line that is not an entry is kept for a person to read.
            if unreadable == 0 {
                let mut a = self.active.lock().unwrap_or_else(|p| p.into_inner());
                self.remove_file(&mut a, index);
            }
        }
        Ok(moved)
    }

    /// Bytes currently held.
    pub fn total_bytes(&self) -> u64 {
        self.active.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// One entry from its JSON line (a file's line, or an S3 object's body).
pub fn parse_entry(line: &str, file: PathBuf) -> Result<StoredDeadLetter, String> {
    let j: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let s = |k: &str| j.get(k).and_then(|v| v.as_str()).map(str::to_string).ok_or(format!("{k} missing"));
    Ok(StoredDeadLetter {
        id: s("id")?,
        at: DateTime::parse_from_rfc3339(&s("at")?).map_err(|e| e.to_string())?.with_timezone(&Utc),
        pipeline: s("pipeline")?,
        sink: s("sink")?,
        reason: s("reason")?,
        change: change_from_typed(j.get("change").ok_or("change missing")?)?,
        file,
    })
}

/// The id of an encoded entry.
fn line_id(line: &str) -> Option<String> {
    let j: serde_json::Value = serde_json::from_str(line).ok()?;
    j.get("id").and_then(|v| v.as_str()).map(str::to_string)
}

/// Read every entry in a DLQ directory (oldest first). Lines that do not parse (a write cut
/// short by a full disk) are reported through `bad`.
pub fn read_all(dir: &Path, mut bad: impl FnMut(&Path, usize, String)) -> std::io::Result<Vec<StoredDeadLetter>> {
    let mut out = Vec::new();
    for (_, path) in files(dir)? {
        let f = File::open(&path)?;
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            match parse_entry(&line, path.clone()) {
                Ok(e) => out.push(e),
                Err(e) => bad(&path, i + 1, e),
            }
        }
    }
    Ok(out)
}

/// File recording each discarded entry (one JSON object per line: id, pipeline, sink, reason,
/// when): the audit trail of `polysync dlq discard`.
pub const DISCARDED: &str = "discarded.jsonl";

/// What `polysync dlq discard` recorded about one entry.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Discarded {
    /// Entry id.
    pub id: String,
    /// Its pipeline and sink, kept with the record so it reads on its own.
    pub pipeline: String,
    /// Sink (`-` for the whole pipeline).
    pub sink: String,
    /// Why it had been dead-lettered.
    pub reason: String,
    /// When it was discarded.
    pub discarded_at: chrono::DateTime<chrono::Utc>,
    /// Who discarded it (`$USER`, when set).
    #[serde(default)]
    pub by: Option<String>,
}

/// Entries discarded so far, by id.
pub fn discarded(dir: &Path) -> std::io::Result<std::collections::HashMap<String, Discarded>> {
    let text = match std::fs::read_to_string(dir.join(DISCARDED)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(e),
    };
    Ok(text.lines().filter_map(|l| serde_json::from_str::<Discarded>(l).ok()).map(|d| (d.id.clone(), d)).collect())
}

/// Record entries as discarded (appended, fsynced) before anything treats them as gone.
pub fn mark_discarded(dir: &Path, entries: &[Discarded]) -> std::io::Result<()> {
    let mut text = String::new();
    for e in entries {
        text.push_str(&serde_json::to_string(e).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    append_synced(&dir.join(DISCARDED), &text)
}

/// Append `text` to a bookkeeping file of the DLQ directory (mode 0600) and fsync it.
fn append_synced(path: &Path, text: &str) -> std::io::Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    let mut opts = OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

/// Ids already replayed.
pub fn replayed_ids(dir: &Path) -> std::io::Result<std::collections::HashSet<String>> {
    match std::fs::read_to_string(dir.join(REPLAYED)) {
        Ok(s) => Ok(s.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(e),
    }
}

/// Record entries as replayed (fsynced).
pub fn mark_replayed(dir: &Path, ids: &[String]) -> std::io::Result<()> {
    let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
    append_synced(&dir.join(REPLAYED), &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Row;

    fn change(i: i64) -> Change {
        let mut key = Row::default();
        key.push("id".into(), crate::change::Value::Int(i));
        Change::test_insert("public.t", key, None)
    }

    #[test]
    fn rotates_bounds_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let dlq = DeadLetterQueue::open(dir.path(), 4096, 20_000).unwrap();
        let mut written = 0;
        let full = loop {
            let c = change(written);
            match dlq.write(&DeadLetter { pipeline: "p", sink: "cache", reason: &"x".repeat(300), change: &c }) {
                Ok(()) => written += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(full, DlqError::Full { .. }), "{full}");
        assert!(full.to_string().contains("is full"), "says so: {full}");
        assert!(files(dir.path()).unwrap().len() > 1, "rotated");
        let back = read_all(dir.path(), |_, _, e| panic!("{e}")).unwrap();
        assert_eq!(back.len() as i64, written, "nothing written was lost; nothing silently dropped");
        assert!(back.iter().enumerate().all(|(i, e)| e.change.key_display() == format!("id={i}")));
        // Reopening continues the accounting (still full).
        let again = DeadLetterQueue::open(dir.path(), 4096, 20_000).unwrap();
        assert!(
            again
                .write(&DeadLetter { pipeline: "p", sink: "c", reason: &"x".repeat(300), change: &change(0) })
                .is_err()
        );
        // Replayed ids are remembered.
        mark_replayed(dir.path(), &[back[0].id.clone()]).unwrap();
        assert!(replayed_ids(dir.path()).unwrap().contains(&back[0].id));
    }

    #[cfg(unix)]
    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let dlq = DeadLetterQueue::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        dlq.write(&DeadLetter { pipeline: "p", sink: "c", reason: "r", change: &change(1) }).unwrap();
        let (_, f) = &files(dir.path()).unwrap()[0];
        assert_eq!(std::fs::metadata(f).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
