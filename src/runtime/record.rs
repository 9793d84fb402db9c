//! A sink record on its way through a sink's queue, and its form in the spool.

use std::sync::Arc;

use serde_json::{Value as J, json};

use crate::change::Name;
use crate::change::json::{change_from_typed, change_to_typed};
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
}

/// The spool form of a record: its pipeline, the whole change (lossless, as the dead-letter
/// queue stores it: a spooled record can still be dead-lettered) and the rendered payload.
pub fn encode(rec: &Record, barrier: bool) -> Vec<u8> {
    let mut j = json!({
        "p": &*rec.pipeline,
        "c": change_to_typed(&rec.change),
        "d": serde_json::to_value(&rec.payload).unwrap_or(J::Null),
    });
    if barrier {
        j["b"] = J::Bool(true);
    }
    serde_json::to_vec(&j).unwrap_or_default()
}

/// Inverse of [`encode`]: the record and whether it is a barrier.
pub fn decode(bytes: &[u8]) -> Result<(Record, bool), String> {
    let j: J = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let pipeline = j.get("p").and_then(J::as_str).ok_or("no pipeline")?;
    let change = change_from_typed(j.get("c").ok_or("no change")?)?;
    let payload: Payload =
        serde_json::from_value(j.get("d").cloned().unwrap_or(J::Null)).map_err(|e| format!("payload: {e}"))?;
    let barrier = j.get("b").and_then(J::as_bool).unwrap_or(false);
    Ok((Record { change: Arc::new(change), pipeline: Name::from(pipeline), payload }, barrier))
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
        let (back, barrier) = decode(&encode(&rec, true)).unwrap();
        assert!(barrier);
        assert_eq!(&*back.pipeline, "p");
        assert_eq!(back.change.key, rec.change.key);
        assert!(matches!(back.payload, Payload::Cache(CacheOp::Invalidate { ref keys }) if keys == &["t:7"]));
    }
}
