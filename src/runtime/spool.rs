//! A sink's durable spool: an append-only log of records on local disk, so a slow or broken
//! sink holds its backlog here instead of in the source's acknowledgement window. A record is
//! acknowledged to the source once it is fsynced here; the sink then applies it at its own pace.
//!
//! Layout under `state_dir/spool/<sink>/`: segment files `seg-<first seq>.log` and a `cursor`
//! file. A frame is `len: u32 LE | crc32: u32 LE | seq: u64 LE | payload`, the checksum over seq
//! and payload. Sequence numbers increase strictly. The cursor is the first sequence number not
//! yet applied; segments wholly below it are deleted. A crash can leave a torn frame at the end
//! of the last segment (it was never acknowledged): opening the spool cuts it off. A bad frame
//! anywhere else is corruption of acknowledged records, and opening refuses with the file name.
//!
//! Every method does blocking file I/O: the async side calls them through `spawn_blocking`.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Frame header: length, checksum, sequence number.
const HEADER: usize = 16;
/// A new segment starts past this size.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Largest payload a frame may carry (a record is a change plus its rendered payload).
pub const MAX_FRAME: usize = 256 << 20;

/// Why the spool could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// File-system failure (disk full, permissions).
    #[error("spool {}: {source}", path.display())]
    Io {
        /// File or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The quota is reached: the caller waits for the sink to catch up.
    #[error("spool {} is full ({used} of {limit} bytes)", dir.display())]
    Full {
        /// Spool directory.
        dir: PathBuf,
        /// Bytes held.
        used: u64,
        /// Configured quota.
        limit: u64,
    },
    /// An acknowledged record cannot be read back.
    #[error("spool {}: corrupt frame at byte {offset} ({why}); these records were acknowledged and cannot be recovered: move the file aside to start (its records are lost) or restore it", path.display())]
    Corrupt {
        /// Segment file.
        path: PathBuf,
        /// Byte offset of the bad frame.
        offset: u64,
        /// What was wrong.
        why: String,
    },
}

struct Segment {
    first: u64,
    path: PathBuf,
    len: u64,
}

struct State {
    segments: Vec<Segment>,
    writer: Option<File>,
    /// Sequence number the next append must exceed (last appended + 1).
    end: u64,
    /// First sequence number not yet applied.
    cursor: u64,
    bytes: u64,
}

/// One sink's spool.
pub struct Spool {
    dir: PathBuf,
    limit: u64,
    state: Mutex<State>,
}

/// Where a reader stands: the next sequence number it returns and its place in the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPos {
    /// Next sequence number to return (records below it are skipped).
    pub next: u64,
    segment_first: u64,
    offset: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.to_owned(), source }
}

fn segment_name(first: u64) -> String {
    format!("seg-{first:020}.log")
}

/// A record as stored: its sequence number and payload.
type Frame = (u64, Vec<u8>);

/// Read one frame at the reader's position: `Ok(None)` at a clean end, `Err(why)` for a torn or
/// bad frame.
fn read_frame(r: &mut impl Read) -> std::io::Result<Result<Option<Frame>, String>> {
    let mut head = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = r.read(&mut head[got..])?;
        if n == 0 {
            return Ok(if got == 0 { Ok(None) } else { Err("truncated header".into()) });
        }
        got += n;
    }
    let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let seq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    if len > MAX_FRAME {
        return Ok(Err(format!("frame length {len} is over the limit")));
    }
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = r.read(&mut payload[got..])?;
        if n == 0 {
            return Ok(Err("truncated payload".into()));
        }
        got += n;
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&head[8..16]);
    h.update(&payload);
    if h.finalize() != crc {
        return Ok(Err("checksum mismatch".into()));
    }
    Ok(Ok(Some((seq, payload))))
}

fn fsync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl Spool {
    /// Open (or create) the spool in `dir`, limited to `limit` bytes; recovers after a crash.
    pub fn open(dir: &Path, limit: u64) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let cursor_path = dir.join("cursor");
        let cursor = match std::fs::read_to_string(&cursor_path) {
            Ok(t) => t.trim().parse::<u64>().map_err(|_| SpoolError::Corrupt {
                path: cursor_path.clone(),
                offset: 0,
                why: format!("cursor {t:?} is not a number"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(SpoolError::Io { path: cursor_path, source: e }),
        };
        let mut firsts: Vec<u64> = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(Ok(first)) = name.strip_prefix("seg-").and_then(|r| r.strip_suffix(".log")).map(str::parse) {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut segments = Vec::new();
        let mut end = cursor;
        let mut last_seq: Option<u64> = None;
        let count = firsts.len();
        for (i, first) in firsts.into_iter().enumerate() {
            let path = dir.join(segment_name(first));
            let mut f = BufReader::new(File::open(&path).map_err(io(&path))?);
            let mut offset = 0u64;
            loop {
                match read_frame(&mut f).map_err(io(&path))? {
                    Ok(None) => break,
                    Ok(Some((seq, payload))) => {
                        if last_seq.is_some_and(|l| seq <= l) {
                            return Err(SpoolError::Corrupt {
                                path,
                                offset,
                                why: format!("sequence {seq} out of order"),
                            });
                        }
                        last_seq = Some(seq);
                        end = end.max(seq + 1);
                        offset += (HEADER + payload.len()) as u64;
                    }
                    Err(why) if i + 1 == count => {
                        // The unacknowledged tail of a write cut short by a crash.
                        tracing::warn!(spool = %path.display(), offset, why, "cutting off a torn record at the end of the spool (it was never acknowledged)");
                        let file = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
                        file.set_len(offset).map_err(io(&path))?;
                        file.sync_all().map_err(io(&path))?;
                        break;
                    }
                    Err(why) => return Err(SpoolError::Corrupt { path, offset, why }),
                }
            }
            segments.push(Segment { first, path, len: offset });
        }
        let bytes = segments.iter().map(|s| s.len).sum();
        let spool = Spool {
            dir: dir.to_owned(),
            limit,
            state: Mutex::new(State { segments, writer: None, end, cursor: cursor.min(end), bytes }),
        };
        spool.prune()?;
        Ok(spool)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// First sequence number not yet applied.
    pub fn cursor(&self) -> u64 {
        self.lock().cursor
    }

    /// One past the last sequence number appended.
    pub fn end(&self) -> u64 {
        self.lock().end
    }

    /// Records held (appended, not yet applied), as sequence numbers span them.
    pub fn backlog(&self) -> u64 {
        let st = self.lock();
        st.end.saturating_sub(st.cursor)
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// The quota.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        let st = self.lock();
        st.cursor >= st.end
    }

    /// Append records (strictly increasing sequence numbers above every earlier one) and fsync.
    /// All or nothing: on error the spool is as before (a partial frame is cut off).
    pub fn append(&self, records: &[(u64, Vec<u8>)]) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut st = self.lock();
        let incoming: u64 = records.iter().map(|(_, p)| (HEADER + p.len()) as u64).sum();
        if st.bytes + incoming > self.limit {
            return Err(SpoolError::Full { dir: self.dir.clone(), used: st.bytes, limit: self.limit });
        }
        let first = records[0].0;
        if first < st.end || records.windows(2).any(|w| w[1].0 <= w[0].0) {
            return Err(SpoolError::Corrupt {
                path: self.dir.clone(),
                offset: 0,
                why: format!("append of sequence {first} after {}", st.end),
            });
        }
        let rotate = st.segments.last().is_none_or(|s| s.len >= SEGMENT_BYTES);
        if rotate {
            let path = self.dir.join(segment_name(first));
            let f = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
            fsync_dir(&self.dir)?;
            st.segments.push(Segment { first, path, len: 0 });
            st.writer = Some(f);
        }
        if st.writer.is_none() {
            let path = st.segments.last().expect("a segment exists").path.clone();
            st.writer = Some(OpenOptions::new().append(true).open(&path).map_err(io(&path))?);
        }
        let mut buf = Vec::with_capacity(incoming as usize);
        for (seq, payload) in records {
            let mut h = crc32fast::Hasher::new();
            h.update(&seq.to_le_bytes());
            h.update(payload);
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&h.finalize().to_le_bytes());
            buf.extend_from_slice(&seq.to_le_bytes());
            buf.extend_from_slice(payload);
        }
        let seg_len = st.segments.last().expect("a segment exists").len;
        let path = st.segments.last().expect("a segment exists").path.clone();
        let w = st.writer.as_mut().expect("opened above");
        let written = w.write_all(&buf).and_then(|_| w.sync_data());
        if let Err(e) = written {
            // Leave no partial frame behind: the next append starts clean.
            let _ = w.set_len(seg_len);
            st.writer = None;
            return Err(SpoolError::Io { path, source: e });
        }
        let last = st.segments.last_mut().expect("a segment exists");
        last.len += incoming;
        st.bytes += incoming;
        st.end = records.last().expect("not empty").0 + 1;
        Ok(())
    }

    /// Record that every sequence number below `cursor` is applied; deletes what is no longer
    /// needed. Durable (the cursor file is replaced atomically).
    pub fn commit(&self, cursor: u64) -> Result<(), SpoolError> {
        {
            let mut st = self.lock();
            if cursor <= st.cursor {
                return Ok(());
            }
            st.cursor = cursor.min(st.end);
        }
        let c = self.cursor();
        let tmp = self.dir.join("cursor.tmp");
        let path = self.dir.join("cursor");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(c.to_string().as_bytes()).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        self.prune()
    }

    /// Delete segments wholly below the cursor.
    fn prune(&self) -> Result<(), SpoolError> {
        let mut st = self.lock();
        let cursor = st.cursor;
        let all_applied = cursor >= st.end;
        let mut removed = false;
        while !st.segments.is_empty() {
            let next_first = st.segments.get(1).map(|s| s.first);
            let wholly_below = match next_first {
                Some(n) => n <= cursor,
                None => all_applied,
            };
            if !wholly_below {
                break;
            }
            let seg = st.segments.remove(0);
            if st.segments.is_empty() {
                st.writer = None;
            }
            std::fs::remove_file(&seg.path).map_err(io(&seg.path))?;
            st.bytes -= seg.len;
            removed = true;
        }
        drop(st);
        if removed {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// A reader position at the cursor.
    pub fn start(&self) -> ReadPos {
        let st = self.lock();
        let seg = st.segments.iter().rev().find(|s| s.first <= st.cursor).or(st.segments.first());
        ReadPos { next: st.cursor, segment_first: seg.map_or(st.cursor, |s| s.first), offset: 0 }
    }

    /// Up to `max` records at or after `pos` (records below `pos.next` are skipped), advancing
    /// `pos`. Reads only what appends have made durable. Empty when caught up.
    pub fn read(&self, pos: &mut ReadPos, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let (path, len, next_segment) = {
            let st = self.lock();
            let Some(i) = st.segments.iter().position(|s| s.first == pos.segment_first).or_else(|| {
                // Our segment was pruned (everything in it applied): go to the first one left.
                st.segments.iter().position(|s| s.first >= pos.segment_first)
            }) else {
                return Ok(Vec::new());
            };
            let seg = &st.segments[i];
            if seg.first != pos.segment_first {
                pos.segment_first = seg.first;
                pos.offset = 0;
            }
            (seg.path.clone(), seg.len, st.segments.get(i + 1).map(|s| s.first))
        };
        let mut out = Vec::new();
        if pos.offset < len {
            let mut f = File::open(&path).map_err(io(&path))?;
            f.seek(SeekFrom::Start(pos.offset)).map_err(io(&path))?;
            let mut r = BufReader::new(f.take(len - pos.offset));
            while out.len() < max && pos.offset < len {
                match read_frame(&mut r).map_err(io(&path))? {
                    Ok(Some((seq, payload))) => {
                        pos.offset += (HEADER + payload.len()) as u64;
                        if seq >= pos.next {
                            pos.next = seq + 1;
                            out.push((seq, payload));
                        }
                    }
                    Ok(None) => break,
                    Err(why) => return Err(SpoolError::Corrupt { path, offset: pos.offset, why }),
                }
            }
        }
        if out.len() < max
            && pos.offset >= len
            && let Some(n) = next_segment
        {
            pos.segment_first = n;
            pos.offset = 0;
            let rest = self.read(pos, max - out.len())?;
            out.extend(rest);
        }
        Ok(out)
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(from: u64, n: u64) -> Vec<(u64, Vec<u8>)> {
        (from..from + n).map(|s| (s, format!("record {s}").into_bytes())).collect()
    }

    #[test]
    fn appends_read_back_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&recs(0, 10)).unwrap();
        s.append(&recs(10, 5)).unwrap();
        let mut pos = s.start();
        let got = s.read(&mut pos, 100).unwrap();
        assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), (0..15).collect::<Vec<_>>());
        assert!(s.read(&mut pos, 100).unwrap().is_empty(), "caught up");
        s.commit(7).unwrap();
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((s.cursor(), s.end()), (7, 15));
        let mut pos = s.start();
        let got = s.read(&mut pos, 100).unwrap();
        assert_eq!(got.first().map(|r| r.0), Some(7), "resumes at the cursor");
        assert_eq!(got.last().map(|r| r.0), Some(14));
        assert_eq!(got[0].1, b"record 7");
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_corruption_elsewhere_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&recs(0, 3)).unwrap();
        let seg = dir.path().join(segment_name(0));
        drop(s);
        let good = std::fs::metadata(&seg).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap(); // half a header
        drop(f);
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), good);
        assert_eq!(s.end(), 3);
        s.append(&recs(3, 1)).unwrap();
        drop(s);
        // Flip a byte inside the first frame's payload.
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[HEADER + 2] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        // Make it not the last segment so the damage is not a torn tail.
        let later = dir.path().join(segment_name(100));
        std::fs::write(&later, b"").unwrap();
        assert!(matches!(Spool::open(dir.path(), 1 << 20), Err(SpoolError::Corrupt { .. })));
    }

    #[test]
    fn the_quota_refuses_and_commits_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 200).unwrap();
        s.append(&recs(0, 5)).unwrap();
        assert!(matches!(s.append(&recs(5, 5)), Err(SpoolError::Full { .. })));
        s.commit(5).unwrap();
        assert_eq!(s.bytes(), 0, "everything applied: the segment is gone");
        s.append(&recs(5, 5)).unwrap();
        let mut pos = s.start();
        assert_eq!(s.read(&mut pos, 100).unwrap().len(), 5);
    }
}
