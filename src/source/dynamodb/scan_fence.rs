//! Keeps a backfill row from being handed over after a newer stream record of its item.
//!
//! A scan row is versioned at the time its page was read. Per key, the lanes apply changes in
//! the order they were handed over, so a row handed over *before* the stream's next record of
//! the item is overwritten by it, as it should be. The danger is the other order: under
//! backpressure a page can wait while the stream hands over a delete of one of its items; the
//! row, older than the delete, then reaches the sink after it. The sink's version guard
//! refuses it while the delete's tombstone lasts, but OpenSearch forgets tombstones after
//! `index.gc_deletes` (60 s), and then the row would bring the deleted item back.
//!
//! So each page's keys are registered here until their rows are handed over. The stream reader
//! tells the fence about every record before handing it over; a record at least as new as the
//! page (minus the clock margin) marks the key superseded, and the backfill skips that row: the
//! stream carries the item's state from then on. Check-and-hand-over of a row and the
//! reader's mark run under one lock, so no record can slip between them. Memory is bounded by
//! the pages in flight (one per segment).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::change::{Change, Row};
use crate::source::{Partition, SendError};

/// See the module docs.
#[derive(Debug, Default)]
pub struct ScanFence {
    pending: Mutex<HashMap<String, Pending>>,
}

#[derive(Debug)]
struct Pending {
    /// When the page holding the row was read (Unix seconds, clock margin already taken off).
    read_at: i64,
    /// A stream record at least that new was handed over since.
    superseded: bool,
}

/// What became of a scan row.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// Handed over to the lanes.
    Sent,
    /// A newer stream record of the item was handed over first: the row was dropped.
    Superseded,
}

/// Key identity independent of attribute order (stream keys and scan keys list the key
/// attributes in different orders).
fn identity(key: &Row) -> String {
    let mut fields: Vec<(String, String)> = key
        .iter()
        .map(|(n, v)| {
            let mut one = Row::with_capacity(1);
            one.push(n.clone(), v.clone());
            (n.to_string(), one.identity())
        })
        .collect();
    fields.sort();
    fields.into_iter().map(|(_, text)| text).collect::<Vec<_>>().join("\u{1e}")
}

impl ScanFence {
    /// Register a page's keys before any of its rows is offered.
    pub fn register(&self, keys: impl IntoIterator<Item = Row>, read_at: i64) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            p.insert(identity(&k), Pending { read_at, superseded: false });
        }
    }

    /// The stream reader is about to hand over a record of `key` created at `created` (Unix
    /// seconds): a registered row of the item from a page read no later than that is superseded.
    pub fn stream_record(&self, key: &Row, created: Option<i64>) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_empty() {
            return;
        }
        if let Some(entry) = p.get_mut(&identity(key))
            && created.is_none_or(|c| c >= entry.read_at)
        {
            entry.superseded = true;
        }
    }

    /// Hand a scan row over unless it was superseded, under the lock the stream's mark takes;
    /// `Err` gives the row back when the partition is full (wait for room, then offer again).
    pub fn offer(&self, partition: &dyn Partition, change: Change) -> Result<Offered, SendError> {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let id = identity(&change.key);
        if p.get(&id).is_some_and(|e| e.superseded) {
            p.remove(&id);
            return Ok(Offered::Superseded);
        }
        partition.try_send(change)?;
        p.remove(&id);
        Ok(Offered::Sent)
    }

    /// Forget a page's remaining keys (the backfill stopped part-way).
    pub fn forget(&self, keys: impl IntoIterator<Item = Row>) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            p.remove(&identity(&k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Name, Value};

    fn key(pairs: &[(&str, &str)]) -> Row {
        let mut r = Row::with_capacity(pairs.len());
        for (n, v) in pairs {
            r.push(Name::from(*n), Value::Text(v.to_string()));
        }
        r
    }

    #[test]
    fn a_stream_record_at_least_as_new_as_the_page_supersedes_its_row_whatever_the_key_order() {
        let f = ScanFence::default();
        f.register([key(&[("pk", "a"), ("sk", "1")]), key(&[("pk", "b"), ("sk", "1")])], 100);
        // Older than the page: the page holds a newer state; nothing superseded.
        f.stream_record(&key(&[("sk", "1"), ("pk", "b")]), Some(99));
        // As new as the page, keys listed the other way round (stream images sort by name).
        f.stream_record(&key(&[("sk", "1"), ("pk", "a")]), Some(100));
        let p = f.pending.lock().unwrap();
        assert!(p[&identity(&key(&[("pk", "a"), ("sk", "1")]))].superseded);
        assert!(!p[&identity(&key(&[("pk", "b"), ("sk", "1")]))].superseded);
    }
}
