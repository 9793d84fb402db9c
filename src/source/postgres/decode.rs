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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Messages captured from PostgreSQL 15 by `tests/capture.rs`: (type letter, bytes).
    pub(crate) fn captured() -> Vec<(char, Bytes)> {
        include_str!("../../../tests/fixtures/pgoutput/stream.hex")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let (label, hex) = l.split_once('\t').expect("label<TAB>hex");
                (label.chars().next().unwrap(), Bytes::from(hex::decode(hex).expect("hex")))
            })
            .collect()
    }

    fn text(v: &TupleValue) -> &str {
        match v {
            TupleValue::Text(b) => std::str::from_utf8(b).unwrap(),
            other => panic!("not text: {other:?}"),
        }
    }

    #[test]
    fn every_captured_message_decodes() {
        let msgs = captured();
        assert!(msgs.len() > 30);
        for (label, data) in &msgs {
            let m = decode(data.clone()).unwrap_or_else(|e| panic!("{label}: {e}"));
            let kind = match m {
                PgOutput::Begin { .. } => 'B',
                PgOutput::Commit { .. } => 'C',
                PgOutput::Origin { .. } => 'O',
                PgOutput::Relation { .. } => 'R',
                PgOutput::Type { .. } => 'Y',
                PgOutput::Insert { .. } => 'I',
                PgOutput::Update { .. } => 'U',
                PgOutput::Delete { .. } => 'D',
                PgOutput::Truncate { .. } => 'T',
                PgOutput::Message { .. } => 'M',
            };
            assert_eq!(kind, *label);
        }
    }

    #[test]
    fn captured_messages_carry_what_the_server_sent() {
        let msgs: Vec<PgOutput> = captured().into_iter().map(|(_, d)| decode(d).unwrap()).collect();
        let PgOutput::Begin { final_lsn, xid, .. } = &msgs[0] else { panic!("first is Begin") };
        let PgOutput::Commit { commit_lsn, end_lsn, .. } = &msgs[4] else { panic!("fifth is Commit") };
        assert_eq!(final_lsn, commit_lsn, "Begin's final LSN is the commit LSN");
        assert!(end_lsn > commit_lsn && *xid > 0);

        let PgOutput::Type { name, namespace, oid: mood } = &msgs[1] else { panic!("Type") };
        assert_eq!((namespace.as_str(), name.as_str()), ("public", "mood"));
        let PgOutput::Relation { name, replica_identity, columns, oid: t_oid, .. } = &msgs[2] else {
            panic!("Relation")
        };
        assert_eq!((name.as_str(), *replica_identity), ("t", b'd'));
        let cols: Vec<(&str, u32, bool)> = columns.iter().map(|c| (c.name.as_str(), c.type_oid, c.is_key)).collect();
        assert_eq!(
            cols,
            vec![
                ("id", 23, true),
                ("name", 25, false),
                ("m", *mood, false),
                ("big", 25, false),
                ("n", 1700, false),
                ("tags", 1009, false),
                ("at", 1184, false)
            ]
        );

        let PgOutput::Insert { relation, new } = &msgs[3] else { panic!("Insert") };
        assert_eq!(relation, t_oid);
        assert_eq!(text(&new[0]), "1");
        assert_eq!(text(&new[1]), "a'b");
        assert_eq!(text(&new[2]), "happy");
        assert_eq!(text(&new[3]).len(), 64_000);
        assert_eq!(text(&new[4]), "12345678901234567890.0001");
        assert_eq!(text(&new[5]), r#"{x,"y z",NULL}"#);
        assert_eq!(text(&new[6]), "2024-01-02 03:04:05.123456+00");

        // Rename: the TOASTed column is not sent.
        let PgOutput::Update { old: None, new, .. } = &msgs[6] else { panic!("Update without old") };
        assert_eq!(text(&new[1]), "renamed");
        assert_eq!(new[3], TupleValue::Unchanged);

        // Key change: the old key is sent ('K'), other old columns as null.
        let PgOutput::Update { old: Some((b'K', old)), new, .. } = &msgs[9] else { panic!("Update with old key") };
        assert_eq!(text(&old[0]), "1");
        assert!(old[1..].iter().all(|v| *v == TupleValue::Null));
        assert_eq!(text(&new[0]), "2");

        // REPLICA IDENTITY FULL: old full tuple on update and delete.
        let PgOutput::Relation { name, replica_identity: b'f', columns, .. } = &msgs[12] else { panic!("Relation f") };
        assert_eq!(name, "f");
        assert!(columns.iter().all(|c| c.is_key), "FULL flags every column");
        let PgOutput::Update { old: Some((b'O', old)), new, .. } = &msgs[16] else { panic!("Update with old tuple") };
        assert_eq!((text(&old[1]), text(&new[1])), ("full", "fuller"));
        let PgOutput::Delete { old: (b'O', old), .. } = &msgs[19] else { panic!("Delete full") };
        assert_eq!(text(&old[1]), "fuller");
        let PgOutput::Delete { old: (b'K', old), .. } = &msgs[22] else { panic!("Delete key") };
        assert_eq!(text(&old[0]), "2");

        let PgOutput::Insert { new, .. } = &msgs[25] else { panic!("Insert with nulls") };
        assert_eq!(new[1], TupleValue::Null);

        let PgOutput::Message { transactional: true, prefix, content, .. } = &msgs[28] else { panic!("Message") };
        assert_eq!((prefix.as_str(), &content[..]), ("polysync.test", &b"hello"[..]));
        let PgOutput::Origin { name, lsn } = &msgs[32] else { panic!("Origin") };
        assert_eq!((name.as_str(), *lsn), ("upstream", 0xABCDEF));

        let PgOutput::Truncate { relations, options } = &msgs[39] else { panic!("Truncate") };
        assert_eq!(relations.len(), 2);
        assert_eq!(*options, 0);
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for (_, data) in captured() {
            for cut in 0..data.len() {
                let _ = decode(data.slice(..cut));
            }
        }
        assert!(decode(Bytes::from_static(b"Z")).is_err());
        assert!(decode(Bytes::new()).is_err());
        // Column count far beyond the data.
        assert!(decode(Bytes::from_static(b"I\0\0\0\x01N\x7f\xff")).is_err());
    }
}
