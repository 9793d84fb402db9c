//! pgoutput (protocol version 1) messages, decoded without copying column data: tuple values
//! are `Bytes` slices of the frame the socket read.
//!
//! Reference: PostgreSQL docs, "Logical Replication Message Formats". Every read is bounds
//! checked; a malformed message is an error naming the message kind, never a panic.

use bytes::{Buf, Bytes};

/// A decode failure: which message and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput {message}: {reason}")]
pub struct DecodeError {
    /// Message kind (`Begin`, `Relation`, …).
    pub message: &'static str,
    /// What was wrong.
    pub reason: String,
}

/// One column of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// SQL NULL.
    Null,
    /// TOASTed value not changed by this update: not sent, must not be treated as NULL.
    Unchanged,
    /// Text representation.
    Text(Bytes),
    /// Binary representation (only with the `binary` option, which polysync does not request).
    Binary(Bytes),
}

/// Column description from a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (key).
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutput {
    /// Start of a transaction.
    Begin {
        /// LSN of the commit record (the transaction's version).
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_time: i64,
        /// Transaction id.
        xid: u32,
    },
    /// End of a transaction.
    Commit {
        /// Flags (unused, 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// LSN just after the commit record: what to confirm once applied.
        end_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_time: i64,
    },
    /// Replication origin of the following changes.
    Origin {
        /// Commit LSN on the origin server.
        lsn: u64,
        /// Origin name.
        name: String,
    },
    /// Table description; precedes the first change of the table in a session and follows
    /// schema changes.
    Relation {
        /// Table OID.
        oid: u32,
        /// Schema.
        namespace: String,
        /// Table name.
        name: String,
        /// Replica identity setting (`d`, `n`, `f`, `i`).
        replica_identity: u8,
        /// Columns.
        columns: Vec<RelationColumn>,
    },
    /// A non-built-in type's name.
    Type {
        /// Type OID.
        oid: u32,
        /// Schema.
        namespace: String,
        /// Type name.
        name: String,
    },
    /// Inserted row.
    Insert {
        /// Table OID.
        relation: u32,
        /// New tuple.
        new: Vec<TupleValue>,
    },
    /// Updated row.
    Update {
        /// Table OID.
        relation: u32,
        /// Old key (`K`) or old full tuple (`O`), when sent.
        old: Option<(u8, Vec<TupleValue>)>,
        /// New tuple.
        new: Vec<TupleValue>,
    },
    /// Deleted row.
    Delete {
        /// Table OID.
        relation: u32,
        /// Old key (`K`) or old full tuple (`O`).
        old: (u8, Vec<TupleValue>),
    },
    /// Truncated tables.
    Truncate {
        /// 1 = CASCADE, 2 = RESTART IDENTITY.
        options: u8,
        /// Table OIDs.
        relations: Vec<u32>,
    },
    /// `pg_logical_emit_message` output (only with the `messages` option).
    Message {
        /// Transactional flag.
        transactional: bool,
        /// LSN of the message.
        lsn: u64,
        /// Prefix.
        prefix: String,
        /// Content.
        content: Bytes,
    },
}

struct Reader {
    b: Bytes,
    message: &'static str,
}

impl Reader {
    fn err(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError { message: self.message, reason: reason.into() }
    }
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.b.remaining() < n {
            Err(self.err(format!("truncated: need {n} more bytes, have {}", self.b.remaining())))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.b.get_u8())
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        self.need(2)?;
        Ok(self.b.get_i16())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.b.get_u32())
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        self.need(4)?;
        Ok(self.b.get_i32())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.b.get_u64())
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        self.need(8)?;
        Ok(self.b.get_i64())
    }
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let Some(end) = self.b.iter().position(|&c| c == 0) else {
            return Err(self.err("unterminated string"));
        };
        let s = std::str::from_utf8(&self.b[..end]).map_err(|_| self.err("string is not UTF-8"))?.to_string();
        self.b.advance(end + 1);
        Ok(s)
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.b.split_to(n))
    }
    fn tuple(&mut self) -> Result<Vec<TupleValue>, DecodeError> {
        let n = self.i16()?;
        if n < 0 {
            return Err(self.err(format!("negative column count {n}")));
        }
        let mut cols = Vec::with_capacity(n as usize);
        for _ in 0..n {
            cols.push(match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::Unchanged,
                kind @ (b't' | b'b') => {
                    let len = self.i32()?;
                    if len < 0 {
                        return Err(self.err(format!("negative value length {len}")));
                    }
                    let data = self.bytes(len as usize)?;
                    if kind == b't' { TupleValue::Text(data) } else { TupleValue::Binary(data) }
                }
                other => return Err(self.err(format!("unknown tuple column kind {other:#04x}"))),
            });
        }
        Ok(cols)
    }
}

/// Decode one pgoutput message (the payload of an XLogData frame).
pub fn decode(data: Bytes) -> Result<PgOutput, DecodeError> {
    if data.is_empty() {
        return Err(DecodeError { message: "message", reason: "empty".into() });
    }
    let tag = data[0];
    let message = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        other => {
            return Err(DecodeError { message: "message", reason: format!("unknown message type {other:#04x}") });
        }
    };
    let mut r = Reader { b: data.slice(1..), message };
    let out = match tag {
        b'B' => PgOutput::Begin { final_lsn: r.u64()?, commit_time: r.i64()?, xid: r.u32()? },
        b'C' => PgOutput::Commit { flags: r.u8()?, commit_lsn: r.u64()?, end_lsn: r.u64()?, commit_time: r.i64()? },
        b'O' => PgOutput::Origin { lsn: r.u64()?, name: r.cstr()? },
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n.max(0) {
                columns.push(RelationColumn {
                    is_key: r.u8()? & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            PgOutput::Relation { oid, namespace, name, replica_identity, columns }
        }
        b'Y' => PgOutput::Type { oid: r.u32()?, namespace: r.cstr()?, name: r.cstr()? },
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => PgOutput::Insert { relation, new: r.tuple()? },
                other => return Err(r.err(format!("expected 'N', got {other:#04x}"))),
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                old = Some((kind, r.tuple()?));
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(r.err(format!("expected 'N', got {kind:#04x}")));
            }
            PgOutput::Update { relation, old, new: r.tuple()? }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = r.u8()?;
            if kind != b'K' && kind != b'O' {
                return Err(r.err(format!("expected 'K' or 'O', got {kind:#04x}")));
            }
            PgOutput::Delete { relation, old: (kind, r.tuple()?) }
        }
        b'T' => {
            let n = r.u32()?;
            let options = r.u8()?;
            if n as usize > r.b.remaining() / 4 {
                return Err(r.err(format!("{n} relations do not fit in the message")));
            }
            let relations = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            PgOutput::Truncate { options, relations }
        }
        b'M' => {
            let transactional = r.u8()? & 1 == 1;
            let lsn = r.u64()?;
            let prefix = r.cstr()?;
            let len = r.i32()?;
            if len < 0 {
                return Err(r.err("negative content length"));
            }
            PgOutput::Message { transactional, lsn, prefix, content: r.bytes(len as usize)? }
        }
        _ => unreachable!("tag checked above"),
    };
    Ok(out)
}
