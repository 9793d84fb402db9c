//! DynamoDB Streams records → [`Change`]s, exactly: `N` stays a decimal string (38 digits
//! and all), sets stay sets, binary stays bytes, nested maps and lists keep their shape. Map
//! attributes are sorted by name so a change (and its key's lane) never depends on hash order.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodbstreams::types::{AttributeValue, OperationType, Record};
use chrono::{DateTime, Utc};

use crate::change::{Change, Name, Op, Position, Row, Value, Version};

/// One exact mapping for both SDKs' `AttributeValue`: stream records
/// (`aws-sdk-dynamodbstreams`) and Scan items (`aws-sdk-dynamodb`) are distinct types of the
/// same shape.
macro_rules! attribute_mapping {
    ($av:ty, $attribute:ident, $image:ident) => {
        /// Convert one attribute value.
        pub fn $attribute(v: &$av) -> Value {
            type A = $av;
            match v {
                A::S(s) => Value::Text(s.clone()),
                A::N(n) => Value::Decimal(n.clone()),
                A::B(b) => Value::Bytes(b.as_ref().to_vec()),
                A::Bool(b) => Value::Bool(*b),
                A::Null(_) => Value::Null,
                A::Ss(items) => Value::Set(items.iter().map(|s| Value::Text(s.clone())).collect()),
                A::Ns(items) => Value::Set(items.iter().map(|s| Value::Decimal(s.clone())).collect()),
                A::Bs(items) => Value::Set(items.iter().map(|b| Value::Bytes(b.as_ref().to_vec())).collect()),
                A::L(items) => Value::List(items.iter().map($attribute).collect()),
                A::M(m) => {
                    let mut pairs: Vec<(String, Value)> = m.iter().map(|(k, v)| (k.clone(), $attribute(v))).collect();
                    pairs.sort_by(|a, b| a.0.cmp(&b.0));
                    Value::Map(pairs)
                }
                other => Value::Other { type_name: "dynamodb".into(), text: format!("{other:?}") },
            }
        }

        /// An item image as a row (attributes sorted by name).
        pub fn $image(m: &HashMap<String, $av>) -> Row {
            let mut names: Vec<&String> = m.keys().collect();
            names.sort();
            names.into_iter().map(|n| (Name::from(n.as_str()), $attribute(&m[n]))).collect()
        }
    };
}

attribute_mapping!(AttributeValue, attribute, image);
attribute_mapping!(aws_sdk_dynamodb::types::AttributeValue, scanned_attribute, scanned_image);

/// A stream record as a change; `None` (with the reason) for records that cannot be one.
pub fn change(source: &Name, relation: &Name, shard: &Name, rec: &Record) -> Result<Change, String> {
    let sr = rec.dynamodb().ok_or("record without a dynamodb section")?;
    let seq = sr.sequence_number().ok_or("record without a sequence number")?;
    let version = Version::parse_decimal(seq)
        .ok_or_else(|| format!("sequence number {seq:?} is not a number of at most 40 digits"))?;
    let op = match rec.event_name() {
        Some(OperationType::Insert) => Op::Insert,
        Some(OperationType::Modify) => Op::Update,
        Some(OperationType::Remove) => Op::Delete,
        other => return Err(format!("unknown event name {other:?}")),
    };
    let key = sr.keys().map(image).unwrap_or_default();
    if key.is_empty() {
        return Err(format!("record {seq} carries no key"));
    }
    let ttl = rec
        .user_identity()
        .is_some_and(|u| u.r#type() == Some("Service") && u.principal_id() == Some("dynamodb.amazonaws.com"));
    let commit_time: Option<DateTime<Utc>> =
        sr.approximate_creation_date_time().and_then(|t| DateTime::from_timestamp(t.secs(), t.subsec_nanos()));
    Ok(Change {
        source: Arc::clone(source),
        relation: Arc::clone(relation),
        op,
        key,
        before: sr.old_image().map(image),
        after: sr.new_image().map(image),
        unchanged: Vec::new(),
        position: Position::Ddb { shard: Arc::clone(shard), sequence: version },
        version,
        commit_time,
        tx: None,
        origin: ttl.then(|| Name::from("ttl-expiry")),
        key_changed: false,
    })
}

/// A record [`change`] refused, as a dead-letter entry can hold it: whatever key and images
/// it has, and the whole record as text under `after.raw_record`, at its position (sequence 0
/// when it has no usable one). Replay refuses it (pipeline `-`): it is kept for a person.
pub fn undecodable(source: &Name, relation: &Name, shard: &Name, rec: &Record) -> Change {
    let sr = rec.dynamodb();
    let version = sr.and_then(|d| d.sequence_number()).and_then(Version::parse_decimal).unwrap_or(Version::from_u64(0));
    let mut after = sr.and_then(|d| d.new_image()).map(image).unwrap_or_default();
    after.push(Name::from("raw_record"), Value::Text(format!("{rec:?}")));
    Change {
        source: Arc::clone(source),
        relation: Arc::clone(relation),
        op: Op::Insert,
        key: sr.and_then(|d| d.keys()).map(image).unwrap_or_default(),
        before: sr.and_then(|d| d.old_image()).map(image),
        after: Some(after),
        unchanged: Vec::new(),
        position: Position::Ddb { shard: Arc::clone(shard), sequence: version },
        version,
        commit_time: None,
        tx: None,
        origin: None,
        key_changed: false,
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_dynamodbstreams::primitives::{Blob, DateTime as AwsDateTime};
    use aws_sdk_dynamodbstreams::types::{Identity, StreamRecord};

    use super::*;

    #[test]
    fn every_attribute_type_is_exact() {
        let thirty_eight = "12345678901234567890123456789012345678";
        let mut nested = HashMap::new();
        nested.insert("z".to_string(), AttributeValue::N("1".into()));
        nested.insert("a".to_string(), AttributeValue::L(vec![AttributeValue::Bool(true), AttributeValue::Null(true)]));
        let mut item = HashMap::new();
        item.insert("user_id".to_string(), AttributeValue::S("u1".into()));
        item.insert("n".to_string(), AttributeValue::N(thirty_eight.into()));
        item.insert("bin".to_string(), AttributeValue::B(Blob::new(vec![0u8, 255])));
        item.insert("tags".to_string(), AttributeValue::Ss(vec!["a".into(), "b".into()]));
        item.insert("nums".to_string(), AttributeValue::Ns(vec!["1.50".into()]));
        item.insert("m".to_string(), AttributeValue::M(nested));
        let row = image(&item);
        let names: Vec<&str> = row.iter().map(|(n, _)| &**n).collect();
        assert_eq!(names, vec!["bin", "m", "n", "nums", "tags", "user_id"], "sorted");
        assert_eq!(row.get("n"), Some(&Value::Decimal(thirty_eight.into())));
        assert_eq!(row.get("bin"), Some(&Value::Bytes(vec![0, 255])));
        assert_eq!(row.get("tags"), Some(&Value::Set(vec![Value::Text("a".into()), Value::Text("b".into())])));
        assert_eq!(row.get("nums"), Some(&Value::Set(vec![Value::Decimal("1.50".into())])));
        assert_eq!(
            row.get("m"),
            Some(&Value::Map(vec![
                ("a".into(), Value::List(vec![Value::Bool(true), Value::Null])),
                ("z".into(), Value::Decimal("1".into()))
            ]))
        );
    }

    #[test]
    fn ttl_deletes_are_marked_and_versions_are_the_sequence_number() {
        let mut keys = HashMap::new();
        keys.insert("user_id".to_string(), AttributeValue::S("u1".into()));
        let rec = Record::builder()
            .event_name(OperationType::Remove)
            .user_identity(Identity::builder().r#type("Service").principal_id("dynamodb.amazonaws.com").build())
            .dynamodb(
                StreamRecord::builder()
                    .set_keys(Some(keys.clone()))
                    .set_old_image(Some(keys))
                    .sequence_number("4421584500000000017450439091")
                    .approximate_creation_date_time(AwsDateTime::from_secs(1_732_000_000))
                    .build(),
            )
            .build();
        let c = change(&Name::from("s"), &Name::from("profiles"), &Name::from("shard-1"), &rec).unwrap();
        assert_eq!(c.op, Op::Delete);
        assert_eq!(c.origin.as_deref(), Some("ttl-expiry"));
        assert_eq!(c.version.to_string(), "4421584500000000017450439091");
        assert_eq!(c.commit_time.unwrap().timestamp(), 1_732_000_000);
        assert!(c.after.is_none() && c.before.is_some());
    }
}
