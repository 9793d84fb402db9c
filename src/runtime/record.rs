//! A sink record on its way through a sink's queue, and its form in the spool.

use std::sync::Arc;

use serde_json::{Value as J, json};

use crate::change::Name;
use crate::change::json::{change_from_typed, change_to_typed};
use crate::checkpoint::fence::Fence;
use crate::sink::{Payload, Record};

/// A record in a sink's queue: its sequence number in that sink, and whether it waits in
/// memory (holding its change's ticket in the queue) or came back from the spool.
#[derive(Debug, Clone)]
pub struct Item {
    /// Sequence number within the sink (order of arrival).
    pub seq: u64,
    /// The record.
    pub rec: Arc<Record>,
    /// A memory record (its ticket is held by the queue); false for a spooled one.
    pub held: bool,
    /// The lease its change was read under, if any: it is applied only while that is valid.
    pub fence: Option<Arc<Fence>>,
}

impl Item {
    /// Read under a lease that is no longer valid: abandon it, unapplied and unconfirmed.
    pub fn is_fenced_off(&self) -> bool {
        self.fence.as_ref().is_some_and(|f| !f.is_valid())
    }
}

/// The spool form of a record: its pipeline, the whole change (lossless, as the dead-letter
/// queue stores it: a spooled record can still be dead-lettered) and the rendered payload.
/// `leased`: read under a lease, so its change is not confirmed until it is applied (a copy
/// left from an earlier run is read again by the shard's owner and is skipped here).
pub fn encode(rec: &Record, barrier: bool, leased: bool) -> Vec<u8> {
    let mut j = json!({
        "p": &*rec.pipeline,
        "c": change_to_typed(&rec.change),
        "d": serde_json::to_value(&rec.payload).unwrap_or(J::Null),
    });
    if barrier {
        j["b"] = J::Bool(true);
    }
    if leased {
        j["l"] = J::Bool(true);
    }
    serde_json::to_vec(&j).unwrap_or_default()
}

/// What [`decode`] gives back.
pub struct Decoded {
    /// The record.
    pub rec: Record,
    /// A barrier (a truncate).
    pub barrier: bool,
    /// Read under a lease.
    pub leased: bool,
}

/// Inverse of [`encode`].
pub fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    let j: J = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let pipeline = j.get("p").and_then(J::as_str).ok_or("no pipeline")?;
    let change = change_from_typed(j.get("c").ok_or("no change")?)?;
    let payload: Payload =
        serde_json::from_value(j.get("d").cloned().unwrap_or(J::Null)).map_err(|e| format!("payload: {e}"))?;
    let barrier = j.get("b").and_then(J::as_bool).unwrap_or(false);
    let leased = j.get("l").and_then(J::as_bool).unwrap_or(false);
    Ok(Decoded { rec: Record { change: Arc::new(change), pipeline: Name::from(pipeline), payload }, barrier, leased })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, Row, Value};
    use crate::sink::cache::CacheOp;

    #[test]
    fn a_record_round_trips_through_its_spool_form() {
        let key: Row = [(Name::from("id"), Value::Int(7))].into_iter().collect();
        let rec = Record {
            change: Arc::new(Change::test_insert("public.t", key.clone(), Some(key))),
            pipeline: "p".into(),
            payload: Payload::Cache(CacheOp::Invalidate { keys: vec!["t:7".into()] }),
        };
        let Decoded { rec: back, barrier, leased } = decode(&encode(&rec, true, true)).unwrap();
        assert!(barrier && leased);
        assert!(!decode(&encode(&rec, false, false)).unwrap().leased);
        assert_eq!(&*back.pipeline, "p");
        assert_eq!(back.change.key, rec.change.key);
        assert!(matches!(back.payload, Payload::Cache(CacheOp::Invalidate { ref keys }) if keys == &["t:7"]));
    }
}
