//! Arbitrary DynamoDB Streams records (nested maps and lists, sets, numbers of any digits,
//! missing sections) through the record decoder: a change or an error, never a panic.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use aws_sdk_dynamodbstreams::primitives::Blob;
use aws_sdk_dynamodbstreams::types::{AttributeValue, OperationType, Record, StreamRecord};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Attr {
    S(String),
    N(String),
    B(Vec<u8>),
    Bool(bool),
    Null,
    Ss(Vec<String>),
    Ns(Vec<String>),
    L(Vec<Attr>),
    M(Vec<(String, Attr)>),
}

fn attr(a: &Attr, depth: usize) -> AttributeValue {
    if depth > 32 {
        return AttributeValue::Null(true);
    }
    match a {
        Attr::S(s) => AttributeValue::S(s.clone()),
        Attr::N(n) => AttributeValue::N(n.clone()),
        Attr::B(b) => AttributeValue::B(Blob::new(b.clone())),
        Attr::Bool(b) => AttributeValue::Bool(*b),
        Attr::Null => AttributeValue::Null(true),
        Attr::Ss(v) => AttributeValue::Ss(v.clone()),
        Attr::Ns(v) => AttributeValue::Ns(v.clone()),
        Attr::L(v) => AttributeValue::L(v.iter().map(|x| attr(x, depth + 1)).collect()),
        Attr::M(v) => AttributeValue::M(v.iter().map(|(k, x)| (k.clone(), attr(x, depth + 1))).collect()),
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    event: u8,
    sequence: Option<String>,
    keys: Option<Vec<(String, Attr)>>,
    new_image: Option<Vec<(String, Attr)>>,
    old_image: Option<Vec<(String, Attr)>>,
    created: Option<i64>,
}

fn image(v: &Option<Vec<(String, Attr)>>) -> Option<HashMap<String, AttributeValue>> {
    v.as_ref().map(|v| v.iter().map(|(k, a)| (k.clone(), attr(a, 0))).collect())
}

fuzz_target!(|input: Input| {
    let mut sr = StreamRecord::builder()
        .set_sequence_number(input.sequence.clone())
        .set_keys(image(&input.keys))
        .set_new_image(image(&input.new_image))
        .set_old_image(image(&input.old_image));
    if let Some(t) = input.created {
        sr = sr.approximate_creation_date_time(aws_sdk_dynamodbstreams::primitives::DateTime::from_secs(t));
    }
    let event = match input.event % 4 {
        0 => Some(OperationType::Insert),
        1 => Some(OperationType::Modify),
        2 => Some(OperationType::Remove),
        _ => None,
    };
    let rec = Record::builder().set_event_name(event).dynamodb(sr.build()).build();
    let name: polysync::change::Name = "t".into();
    let _ = polysync::source::dynamodb::decode::change(&name, &name, &name, &rec);
});
