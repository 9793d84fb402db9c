//! The 63-bit version that sinks with a signed 64-bit version field compare (OpenSearch
//! `version_type=external_gte`, Timestream `Version`), derived from [`Change::version`] so
//! that, per document or record, a newer change never has a smaller version than an older one.
//!
//! * **PostgreSQL**: the transaction's commit LSN, exactly (LSNs are below 2^63). Every change
//!   of one transaction shares it; the lane's order makes the last one win; a replayed or late
//!   older transaction has a smaller LSN and is refused with 409.
//! * **DynamoDB**: sequence numbers have up to 40 digits, so they cannot be used directly, and
//!   no order-preserving map from 40 digits into 63 bits exists. polysync uses the record's
//!   `ApproximateCreationDateTime` (whole seconds; DynamoDB orders an item's writes and stamps
//!   them with non-decreasing times) shifted left by 30 bits. Per item this never decreases
//!   (a "wrapping" tie-break from the sequence number could invert two writes of one second,
//!   which no replay could repair); two writes of one item in the same second get the *same*
//!   version, where `external_gte` and the per-key lane order make the later one win. A replay
//!   after a crash re-sends a suffix of the stream in order, so the final state converges; an
//!   older change from an earlier second is refused.
//! * **Snapshot rows** carry the consistent point's version, computed the same way.

use crate::change::{Change, Position};

/// Bits below the seconds in a DynamoDB-derived version.
pub const DDB_SHIFT: u32 = 30;

/// The external version for a change, or an error naming why none can be derived.
pub fn external_version(change: &Change) -> Result<i64, String> {
    let is_ddb = match &change.position {
        Position::Ddb { .. } => true,
        Position::Snapshot { .. } => change.version.as_u64().is_none_or(|v| v > i64::MAX as u64),
        Position::Pg { .. } => false,
    };
    if !is_ddb {
        return change
            .version
            .as_u64()
            .and_then(|v| i64::try_from(v).ok())
            .ok_or_else(|| format!("version {} does not fit a signed 64-bit OpenSearch version", change.version));
    }
    let t = change
        .commit_time
        .ok_or_else(|| "a DynamoDB change without ApproximateCreationDateTime has no derivable version".to_string())?;
    let secs = t.timestamp();
    if !(0..(1i64 << (63 - DDB_SHIFT))).contains(&secs) {
        return Err(format!("creation time {t} is out of range for a 63-bit version"));
    }
    Ok(secs << DDB_SHIFT)
}

/// The version the cache guard compares, zero-padded decimal. PostgreSQL changes (and
/// snapshot rows) use their own version; DynamoDB stream changes use the same time-based
/// version as [`external_version`], so stream records and backfill rows of one item compare
/// on one scale (sequence numbers have no relation to a scan's start).
pub fn cache_version(change: &Change) -> Result<String, String> {
    match change.position {
        Position::Ddb { .. } => Ok(crate::change::Version::from_u64(external_version(change)? as u64).padded()),
        _ => Ok(change.version.padded()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::change::{Op, Row, Version};

    fn ddb(seq: &str, secs: i64) -> Change {
        Change {
            source: "d".into(),
            relation: "profiles".into(),
            op: Op::Update,
            key: Row::default(),
            before: None,
            after: None,
            unchanged: vec![],
            position: Position::Ddb { shard: Arc::from("shard-1"), sequence: Version::parse_decimal(seq).unwrap() },
            version: Version::parse_decimal(seq).unwrap(),
            commit_time: Some(Utc.timestamp_opt(secs, 0).unwrap()),
            tx: None,
            origin: None,
            key_changed: false,
        }
    }

    #[test]
    fn postgres_uses_the_commit_lsn() {
        let mut c = ddb("1", 0);
        c.position = Position::Pg { commit_lsn: 0x16_B374_D848, seq: 0 };
        c.version = Version::from_u64(0x16_B374_D848);
        assert_eq!(external_version(&c).unwrap(), 0x16_B374_D848);
        c.version = Version::from_u64(u64::MAX);
        assert!(external_version(&c).is_err());
    }

    #[test]
    fn dynamodb_versions_never_decrease_for_later_writes() {
        // Sequence numbers of one item over a day, 21 to 40 digits, increasing, with times.
        let writes = [
            ("300000000000000499659", 1_732_000_000),
            ("300000000000000499660", 1_732_000_000),
            ("400000000000000499661", 1_732_000_001),
            ("4421584500000000017450439091", 1_732_003_600),
            ("9999999999999999999999999999999999999999", 1_732_086_399),
        ];
        let versions: Vec<i64> = writes.iter().map(|(s, t)| external_version(&ddb(s, *t)).unwrap()).collect();
        assert!(versions.windows(2).all(|w| w[0] <= w[1]), "{versions:?}");
        assert_eq!(versions[0], versions[1], "same second: same version, lane order decides");
        assert!(versions[1] < versions[2], "a later second is strictly newer");
        assert!(versions.iter().all(|v| *v > 0));
    }
}
