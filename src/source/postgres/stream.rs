//! The streaming loop: pgoutput messages → [`Change`]s → lanes, with standby status updates
//! that confirm only what every sink has applied.
//!
//! Confirmation rules (DESIGN.md §1, §3):
//! * a transaction's `end_lsn` becomes confirmable when every change issued before its Commit
//!   is applied or dead-lettered (a window mark);
//! * a keepalive received between transactions marks its `wal_end`: everything the server
//!   decoded up to there has been received, so once the changes before it are applied, WAL up
//!   to there is no longer needed. This is what keeps writes to unpublished tables (or other
//!   databases) from pinning WAL on an idle slot.
//!
//! While the lanes are full the loop keeps answering the server (status updates on their
//! interval and whenever a keepalive asks), so backpressure never trips `wal_sender_timeout`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::config::OnColumnChange;
use super::decode::{PgOutput, TupleValue, decode};
use super::origin::Recorder;
use super::replication::{PG_EPOCH_OFFSET_MICROS, ReplMessage, ReplicationStream};
use super::schema_change::{Observation, SchemaLog};
use super::setup::Catalog;
use super::snapshot::Reread;
use super::snapshot::{Coordinator, PREFIX as SNAPSHOT_PREFIX, Released, Signal};
use super::types::ColumnType;
use crate::change::{Change, Name, Op, Position, Row, SNAPSHOT_ORIGIN, Version};
use crate::source::{Partition, SendError};
use crate::telemetry::metrics;

/// Why the stream loop returned.
#[derive(Debug)]
pub enum StreamEnd {
    /// Shutdown requested; everything in flight was drained (or the hard stop fired).
    Stopped,
    /// The connection failed; reconnect.
    Failed(super::replication::ReplError),
    /// A message could not be decoded or made sense of; reconnecting replays from the last
    /// confirmed position, so nothing is skipped.
    Corrupt(String),
}

struct Column {
    name: Name,
    decoder: ColumnType,
}

struct Relation {
    name: Name,
    columns: Vec<Column>,
    key: Vec<usize>,
    counter: prometheus::IntCounter,
}

struct Tx {
    final_lsn: u64,
    commit_time: Option<DateTime<Utc>>,
    xid: u32,
    seq: u32,
}

/// State of one streaming session.
pub struct Session {
    source: Name,
    catalog: Arc<ArcSwap<Catalog>>,
    relations: HashMap<u32, Relation>,
    custom_types: HashMap<u32, Arc<str>>,
    tx: Option<Tx>,
    pending: VecDeque<Change>,
    received: u64,
    snapshots: Arc<Coordinator>,
    schema: Option<SchemaWatch>,
}

/// How a session reacts to column changes (see [`super::schema_change`]).
pub struct SchemaWatch {
    /// The shapes seen so far.
    pub log: Arc<SchemaLog>,
    /// `on_column_change`.
    pub policy: OnColumnChange,
    /// Snapshots run on this server (PostgreSQL 14+), so a re-read can be queued.
    pub can_reread: bool,
}

fn pg_time(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros + PG_EPOCH_OFFSET_MICROS)
}

impl Session {
    /// A fresh session (relation cache empty: the server re-sends Relation messages).
    pub fn new(source: Name, catalog: Arc<ArcSwap<Catalog>>, snapshots: Arc<Coordinator>) -> Session {
        Session {
            source,
            catalog,
            relations: HashMap::new(),
            custom_types: HashMap::new(),
            tx: None,
            pending: VecDeque::new(),
            received: 0,
            snapshots,
            schema: None,
        }
    }

    /// Watch the tables' shapes: column changes are logged, counted and (by policy) re-read.
    pub fn with_schema_watch(mut self, watch: SchemaWatch) -> Session {
        self.schema = Some(watch);
        self
    }

    /// A Relation message's shape, judged against what was seen before.
    fn watch_shape(&self, table: &str, columns: &[Column], type_oids: &[u32]) {
        let Some(w) = &self.schema else { return };
        let shape: Vec<(String, u32)> = columns.iter().zip(type_oids).map(|(c, t)| (c.name.to_string(), *t)).collect();
        let lsn = self.tx.as_ref().map_or(0, |t| t.final_lsn);
        let Observation::Changed { describe, kinds, shape } = w.log.observe(table, shape, lsn) else { return };
        for k in &kinds {
            metrics().pg_schema_changes.with_label_values(&[&*self.source, table, k]).inc();
        }
        match (w.policy, w.can_reread) {
            (OnColumnChange::Resnapshot, true) => {
                tracing::warn!(source = %self.source, table, change = %describe, "columns changed: PostgreSQL sends no change for the rows this reshaped, so the table is re-read through every pipeline that reads it (on_column_change = \"resnapshot\")");
                let (log, name) = (Arc::clone(&w.log), table.to_string());
                self.snapshots
                    .reread(Reread { relation: table.to_string(), queued: Box::new(move || log.record(&name, shape)) });
            }
            (policy, _) => {
                tracing::warn!(source = %self.source, table, change = %describe, policy = ?policy, "columns changed: copies of rows written before it keep their old shape (PostgreSQL sends no change for them); re-read the table with `polysync snapshot --pipeline <name> --table {table}`");
                w.log.record(table, shape);
            }
        }
    }

    /// Queue a change, letting an open snapshot window see it first.
    fn push(&mut self, c: Change) {
        self.snapshots.observe(&c);
        self.pending.push_back(c);
    }

    /// Snapshot rows released at a high watermark, at this point of the stream.
    fn push_reads(&mut self, rows: Vec<super::snapshot::ReadRow>) -> Result<(), String> {
        if rows.is_empty() {
            return Ok(());
        }
        let tx = self.tx.as_mut().ok_or("snapshot watermark outside a transaction")?;
        for r in rows {
            let seq = tx.seq;
            tx.seq += 1;
            self.pending.push_back(Change {
                source: Arc::clone(&self.source),
                relation: r.relation,
                op: Op::Read,
                key: r.key,
                before: None,
                after: Some(r.row),
                unchanged: Vec::new(),
                position: Position::Pg { commit_lsn: tx.final_lsn, seq },
                version: Version::from_u64(tx.final_lsn),
                commit_time: tx.commit_time,
                tx: Some(tx.xid),
                origin: Some(Name::from(format!("{SNAPSHOT_ORIGIN}{}", r.pipeline))),
                key_changed: false,
            });
        }
        Ok(())
    }

    /// A re-read's clear mark: a truncate of `relation` for `pipeline` only, at this point of
    /// the stream (a barrier: everything before it is applied first, its chunks after).
    fn push_clear(&mut self, relation: Name, pipeline: Name) -> Result<(), String> {
        let tx = self.tx.as_mut().ok_or("snapshot clear mark outside a transaction")?;
        let seq = tx.seq;
        tx.seq += 1;
        self.pending.push_back(Change {
            source: Arc::clone(&self.source),
            relation,
            op: Op::Truncate,
            key: Row::default(),
            before: None,
            after: None,
            unchanged: Vec::new(),
            position: Position::Pg { commit_lsn: tx.final_lsn, seq },
            version: Version::from_u64(tx.final_lsn),
            commit_time: tx.commit_time,
            tx: Some(tx.xid),
            origin: Some(Name::from(format!("{SNAPSHOT_ORIGIN}{pipeline}"))),
            key_changed: false,
        });
        Ok(())
    }

    /// A row inserted into the signal table: a snapshot request, not a change to deliver.
    fn signal(&self, row: &Row) {
        let text = |n: &str| match row.get(n) {
            Some(crate::change::Value::Text(t)) if !t.is_empty() => Some(t.to_string()),
            _ => None,
        };
        let id = match row.get("id") {
            Some(crate::change::Value::Int(i)) => *i,
            _ => 0,
        };
        match text("pipeline") {
            Some(pipeline) => {
                self.snapshots.signal(Signal { id, pipeline, relation: text("relation"), filter: text("filter") })
            }
            None => tracing::error!(source = %self.source, signal = id, "snapshot signal without a pipeline; ignored"),
        }
    }

    fn row(&self, rel: &Relation, tuple: &[TupleValue], only_key: bool) -> Result<(Row, Vec<Name>), String> {
        if tuple.len() != rel.columns.len() {
            return Err(format!("{}: tuple has {} columns, relation has {}", rel.name, tuple.len(), rel.columns.len()));
        }
        let mut row = Row::with_capacity(if only_key { rel.key.len() } else { tuple.len() });
        let mut unchanged = Vec::new();
        for (i, (col, v)) in rel.columns.iter().zip(tuple).enumerate() {
            if only_key && !rel.key.contains(&i) {
                continue;
            }
            match v {
                TupleValue::Null => row.push(Arc::clone(&col.name), crate::change::Value::Null),
                TupleValue::Unchanged => unchanged.push(Arc::clone(&col.name)),
                TupleValue::Text(t) | TupleValue::Binary(t) => row.push(Arc::clone(&col.name), col.decoder.decode(t)),
            }
        }
        Ok((row, unchanged))
    }

    fn key_of(rel: &Relation, row: &Row) -> Row {
        rel.key
            .iter()
            .filter_map(|&i| {
                let n = &rel.columns[i].name;
                row.get(n).map(|v| (Arc::clone(n), v.clone()))
            })
            .collect()
    }

    fn change(
        &mut self,
        rel_oid: u32,
        op: Op,
        key: Row,
        before: Option<Row>,
        after: Option<Row>,
        unchanged: Vec<Name>,
    ) -> Result<Change, String> {
        let rel = self.relations.get(&rel_oid).ok_or_else(|| format!("change for unknown relation oid {rel_oid}"))?;
        let tx = self.tx.as_mut().ok_or("change outside a transaction")?;
        rel.counter.inc();
        let seq = tx.seq;
        tx.seq += 1;
        Ok(Change {
            source: Arc::clone(&self.source),
            relation: Arc::clone(&rel.name),
            op,
            key,
            before,
            after,
            unchanged,
            position: Position::Pg { commit_lsn: tx.final_lsn, seq },
            version: Version::from_u64(tx.final_lsn),
            commit_time: tx.commit_time,
            tx: Some(tx.xid),
            origin: None,
            key_changed: false,
        })
    }

    /// Apply one pgoutput message; changes are queued in `pending`. Returns the commit's
    /// end LSN when the message was a Commit.
    fn handle(&mut self, msg: PgOutput) -> Result<Option<u64>, String> {
        match msg {
            PgOutput::Begin { final_lsn, commit_time, xid } => {
                let commit_time = pg_time(commit_time);
                if let Some(t) = commit_time {
                    let lag = (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0;
                    metrics().source_lag.with_label_values(&[&self.source]).set(lag);
                }
                self.tx = Some(Tx { final_lsn, commit_time, xid, seq: 0 });
            }
            PgOutput::Commit { end_lsn, .. } => {
                self.tx = None;
                self.snapshots.on_commit(end_lsn);
                return Ok(Some(end_lsn));
            }
            PgOutput::Message { transactional: true, prefix, content, .. } if prefix == SNAPSHOT_PREFIX => {
                match self.snapshots.on_message(&content) {
                    Released::Rows(rows) => self.push_reads(rows)?,
                    Released::Clear { relation, pipeline } => self.push_clear(relation, pipeline)?,
                    Released::Nothing => {}
                }
            }
            PgOutput::Origin { .. } | PgOutput::Message { .. } => {}
            PgOutput::Type { oid, namespace, name } => {
                self.custom_types.insert(oid, Arc::from(super::types::qualified_type_name(&namespace, &name)));
            }
            PgOutput::Relation { oid, namespace, name, columns: cols, replica_identity } => {
                let full = format!("{namespace}.{name}");
                let catalog = self.catalog.load();
                let mut flagged = Vec::new();
                let type_oids: Vec<u32> = cols.iter().map(|c| c.type_oid).collect();
                let columns: Vec<Column> = cols
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        if c.is_key {
                            flagged.push(i);
                        }
                        let type_name: Arc<str> = self
                            .custom_types
                            .get(&c.type_oid)
                            .cloned()
                            .or_else(|| catalog.types.name(c.type_oid).map(Arc::from))
                            .unwrap_or_else(|| Arc::from(format!("oid {}", c.type_oid)));
                        Column { name: Name::from(c.name), decoder: catalog.types.column(c.type_oid, type_name) }
                    })
                    .collect();
                // The key is the replica identity (the primary key, or the index of REPLICA
                // IDENTITY USING INDEX), in the table's column order: the order pgoutput flags
                // them in and the order snapshots build keys in. REPLICA IDENTITY FULL flags every
                // column; there the primary key is the key. Without one, the whole row is: an
                // update then moves the row to a new key, which the key-change split turns into
                // a delete of the old row and an insert of the new one, each on its own lane.
                let key = match (replica_identity, catalog.primary_keys.get(&full)) {
                    (b'f', Some(pk)) => {
                        let pos: Vec<usize> =
                            (0..columns.len()).filter(|&i| pk.iter().any(|k| *k == *columns[i].name)).collect();
                        if pos.len() == pk.len() { pos } else { flagged }
                    }
                    _ => flagged,
                };
                self.watch_shape(&full, &columns, &type_oids);
                let counter = metrics().source_changes.with_label_values(&[&*self.source, full.as_str()]);
                self.relations.insert(oid, Relation { name: Name::from(full), columns, key, counter });
                return Ok(None);
            }
            PgOutput::Insert { relation, new } => {
                let rel = self
                    .relations
                    .get(&relation)
                    .ok_or_else(|| format!("insert for unknown relation oid {relation}"))?;
                let (after, unchanged) = self.row(rel, &new, false)?;
                if self.catalog.load().signal_table.as_deref() == Some(&*rel.name) {
                    self.signal(&after);
                    return Ok(None);
                }
                let key = Self::key_of(rel, &after);
                let c = self.change(relation, Op::Insert, key, None, Some(after), unchanged)?;
                self.push(c);
            }
            PgOutput::Update { relation, old, new } => {
                let rel = self
                    .relations
                    .get(&relation)
                    .ok_or_else(|| format!("update for unknown relation oid {relation}"))?;
                let (after, unchanged) = self.row(rel, &new, false)?;
                let before = match &old {
                    Some((kind, tuple)) => Some(self.row(rel, tuple, *kind == b'K')?.0),
                    None => None,
                };
                let mut key = Self::key_of(rel, &after);
                if key.len() < rel.key.len() {
                    // A key column TOAST-unchanged in the new tuple: take it from the old one.
                    if let Some(b) = &before {
                        key = Self::key_of(rel, b);
                    }
                }
                let mut c = self.change(relation, Op::Update, key, before, Some(after), unchanged)?;
                c.complete_unchanged();
                if let Some(delete) = c.split_key_change() {
                    // The insert half takes the next position of the transaction.
                    let tx = self.tx.as_mut().ok_or("change outside a transaction")?;
                    c.position = Position::Pg { commit_lsn: tx.final_lsn, seq: tx.seq };
                    tx.seq += 1;
                    self.push(delete);
                }
                self.push(c);
            }
            PgOutput::Delete { relation, old: (kind, tuple) } => {
                let rel = self
                    .relations
                    .get(&relation)
                    .ok_or_else(|| format!("delete for unknown relation oid {relation}"))?;
                let (before, _) = self.row(rel, &tuple, kind == b'K')?;
                let key = Self::key_of(rel, &before);
                let c = self.change(relation, Op::Delete, key, Some(before), None, Vec::new())?;
                self.push(c);
            }
            PgOutput::Truncate { relations, .. } => {
                for r in relations {
                    let c = self.change(r, Op::Truncate, Row::default(), None, None, Vec::new())?;
                    self.push(c);
                }
            }
        }
        Ok(None)
    }
}

/// Run one streaming session until shutdown or failure.
pub async fn run_session(
    session: &mut Session,
    stream: &mut ReplicationStream,
    partition: &dyn Partition,
    status_interval: Duration,
    recorder: &Recorder,
    cancel: &CancellationToken,
    hard_stop: &CancellationToken,
) -> StreamEnd {
    let window = partition;
    let mut status = tokio::time::interval(status_interval);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let source = session.source.to_string();
    let confirmed_gauge = metrics().pg_confirmed_lsn.with_label_values(&[&source]);
    let in_flight = metrics().in_flight.with_label_values(&[&source]);
    let mut last_sent = u64::MAX;
    let mut pending_mark: Option<u64> = None;
    macro_rules! send_status {
        ($reply:expr) => {{
            let mut flush = window.confirmed();
            if flush != last_sent || $reply {
                // On record before it is confirmed: a slot ahead of the record means someone
                // else moved it (see origin.rs). A record that cannot be written holds the
                // confirmation back.
                if let Err(e) = recorder.confirm(flush).await {
                    if recorder.newly_failing() {
                        tracing::error!(source = %source, error = %e, "cannot record the position to confirm; holding it back until the state record can be written");
                    }
                    flush = recorder.recorded().min(flush);
                }
                tracing::trace!(flush = %crate::change::Lsn(flush), in_flight = window.in_flight(), "status update");
                if let Err(e) = stream.send_status(session.received.max(flush), flush, false).await {
                    return StreamEnd::Failed(e);
                }
                last_sent = flush;
                confirmed_gauge.set(flush as i64);
            }
            in_flight.set(window.in_flight() as i64);
        }};
    }
    loop {
        // Hand queued changes to the lanes, answering the server while we wait for room.
        if !session.pending.is_empty() && hard_stop.is_cancelled() {
            return StreamEnd::Stopped;
        }
        while let Some(mut change) = session.pending.pop_front() {
            loop {
                match partition.try_send(change) {
                    Ok(()) => break,
                    Err(SendError::Closed) => return StreamEnd::Stopped,
                    Err(SendError::Full(c)) => {
                        tokio::select! {
                            biased;
                            _ = hard_stop.cancelled() => return StreamEnd::Stopped,
                            r = partition.room(&c) => if r.is_err() { return StreamEnd::Stopped },
                            _ = status.tick() => send_status!(false),
                        }
                        change = *c;
                    }
                }
            }
        }
        // A Commit's end LSN is confirmable once the changes issued before it are applied.
        if let Some(end_lsn) = pending_mark.take() {
            tracing::trace!(end_lsn = %crate::change::Lsn(end_lsn), issued_in_flight = window.in_flight(), "commit mark");
            window.mark(end_lsn);
        }
        // A message already read needs no select; otherwise wait for one, a status tick or
        // the stop request.
        let msg = match stream.try_recv_buffered() {
            Ok(Some(m)) => Ok(m),
            Err(e) => Err(e),
            Ok(None) => tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = status.tick() => {
                    send_status!(false);
                    continue;
                }
                m = stream.recv() => m,
            },
        };
        match msg {
            Err(e) => return StreamEnd::Failed(e),
            Ok(ReplMessage::Keepalive { wal_end, reply_requested }) => {
                session.received = session.received.max(wal_end);
                tracing::trace!(wal_end = %crate::change::Lsn(wal_end), in_tx = session.tx.is_some(), "keepalive");
                if session.tx.is_none() {
                    // Between transactions: everything decoded before wal_end is received.
                    window.mark(wal_end);
                    if window.in_flight() == 0 {
                        // Caught up: nothing read is waiting for a sink.
                        metrics().source_lag.with_label_values(&[&source]).set(0.0);
                    }
                }
                if reply_requested {
                    send_status!(true);
                }
            }
            Ok(ReplMessage::XLogData { wal_end, data, .. }) => {
                session.received = session.received.max(wal_end);
                let decoded = match decode(data) {
                    Ok(m) => m,
                    Err(e) => return StreamEnd::Corrupt(e.to_string()),
                };
                match session.handle(decoded) {
                    Ok(end) => pending_mark = end,
                    Err(e) => return StreamEnd::Corrupt(e),
                }
            }
        }
    }
    // Shutdown: stop reading, wait for what is in flight, confirm it.
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = hard_stop.cancelled() => break,
            _ = poll.tick() => if window.in_flight() == 0 { break },
            _ = status.tick() => send_status!(false),
        }
    }
    send_status!(true);
    tracing::info!(source = %source, confirmed = %crate::change::Lsn(last_sent), "replication stream drained");
    StreamEnd::Stopped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Value;
    use crate::source::postgres::decode::tests::captured;

    fn changes(catalog: Catalog) -> Vec<Change> {
        let mut s = Session::new(Name::from("src"), Arc::new(ArcSwap::from_pointee(catalog)), Arc::default());
        let mut out = Vec::new();
        for (_, data) in captured() {
            s.handle(decode(data).unwrap()).unwrap();
            out.extend(s.pending.drain(..));
        }
        out
    }

    #[test]
    fn captured_stream_becomes_exact_changes() {
        let mut catalog = Catalog::default();
        catalog.primary_keys.insert("public.f".into(), vec!["id".into()]);
        let c = changes(catalog);
        let ops: Vec<(Op, &str)> = c.iter().map(|c| (c.op, &*c.relation)).collect();
        assert_eq!(
            ops,
            vec![
                (Op::Insert, "public.t"),
                (Op::Update, "public.t"),
                (Op::Delete, "public.t"),
                (Op::Insert, "public.t"),
                (Op::Insert, "public.f"),
                (Op::Update, "public.f"),
                (Op::Delete, "public.f"),
                (Op::Delete, "public.t"),
                (Op::Insert, "public.t"),
                (Op::Insert, "public.t"),
                (Op::Insert, "public.t"),
                (Op::Truncate, "public.t"),
                (Op::Truncate, "public.f"),
            ]
        );
        let ins = &c[0];
        let after = ins.after.as_ref().unwrap();
        assert_eq!(after.get("n"), Some(&Value::Decimal("12345678901234567890.0001".into())));
        assert_eq!(
            after.get("tags"),
            Some(&Value::List(vec![Value::Text("x".into()), Value::Text("y z".into()), Value::Null]))
        );
        // The enum arrives as text tagged with its type name (from the Type message).
        assert_eq!(after.get("m"), Some(&Value::Other { type_name: "mood".into(), text: "happy".into() }));
        assert_eq!(
            ins.version,
            Version::from_u64(match ins.position {
                Position::Pg { commit_lsn, .. } => commit_lsn,
                _ => unreachable!(),
            })
        );
        assert_eq!(ins.key.get("id"), Some(&Value::Int(1)));

        // TOAST: the unchanged column is listed, not present, never NULL.
        let rename = &c[1];
        assert_eq!(rename.unchanged.iter().map(|n| &**n).collect::<Vec<_>>(), vec!["big"]);
        assert!(rename.after.as_ref().unwrap().get("big").is_none());

        // Key change: the delete of the old key, then the insert of the new one, each routed by
        // its own key, both marked as halves of one update.
        let (gone, moved) = (&c[2], &c[3]);
        assert_eq!(gone.key.get("id"), Some(&Value::Int(1)));
        assert!(gone.after.is_none() && gone.key_changed);
        assert_eq!(gone.before.as_ref().unwrap().get("id"), Some(&Value::Int(1)));
        assert_eq!(moved.key.get("id"), Some(&Value::Int(2)));
        assert!(moved.before.is_none() && moved.key_changed);
        assert_eq!(moved.after.as_ref().unwrap().get("id"), Some(&Value::Int(2)));
        assert!(gone.position != moved.position, "each half has its own position");

        // REPLICA IDENTITY FULL with a primary key: key is the primary key only.
        let full_update = &c[5];
        assert_eq!(full_update.key.len(), 1);
        assert_eq!(full_update.before.as_ref().unwrap().get("v"), Some(&Value::Text("full".into())));
        let full_delete = &c[6];
        assert_eq!(full_delete.before.as_ref().unwrap().get("v"), Some(&Value::Text("fuller".into())));
        assert_eq!(c[7].key.get("id"), Some(&Value::Int(2)));
        assert!(c[11].key.is_empty());
        // Changes of one transaction share its version; positions order within it.
        assert!(c.windows(2).all(|w| w[0].version <= w[1].version));
    }
}
