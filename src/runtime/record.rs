//! A sink record on its way through a sink's queue, and its form in the spool.

use std::sync::Arc;

use serde_json::Value as J;

use crate::change::Name;
use crate::change::json::{TypedChange, change_from_typed};
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
    #[derive(serde::Serialize)]
    struct Form<'a> {
        p: &'a str,
        c: TypedChange<'a>,
        d: &'a Payload,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        b: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        l: bool,
    }
    let form = Form { p: &rec.pipeline, c: TypedChange(&rec.change), d: &rec.payload, b: barrier, l: leased };
    serde_json::to_vec(&form).unwrap_or_default()
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
    #[derive(serde::Deserialize)]
    struct Form {
        p: String,
        c: J,
        d: Payload,
        #[serde(default)]
        b: bool,
        #[serde(default)]
        l: bool,
    }
    let f: Form = serde_json::from_slice(bytes).map_err(|e| format!("not a spooled record: {e}"))?;
    let change = change_from_typed(&f.c)?;
    Ok(Decoded {
        rec: Record { change: Arc::new(change), pipeline: Name::from(f.p.as_str()), payload: f.d },
        barrier: f.b,
        leased: f.l,
    })
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
