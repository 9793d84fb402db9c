//! Arbitrary text as a key/id template, rendered against a change with nested values: a
//! template or render error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use polysync::change::{Change, Name, Op, Position, Row, Value, Version};
use polysync::change::scope::ChangeScope;
use polysync::change::template::Template;

fuzz_target!(|text: &str| {
    let Ok(t) = Template::parse(text) else { return };
    let mut row = Row::default();
    row.push(Name::from("id"), Value::Int(42));
    row.push(Name::from("name"), Value::Text("a \"quoted\" {{ name }}".into()));
    row.push(Name::from("n"), Value::Decimal("12345678901234567890.5".into()));
    row.push(
        Name::from("doc"),
        Value::Map(vec![("a".into(), Value::List(vec![Value::Null, Value::Bool(true), Value::Bytes(vec![0, 255])]))]),
    );
    let change = Change {
        source: "db".into(),
        relation: "public.t".into(),
        op: Op::Update,
        key: row.iter().take(1).map(|(n, v)| (n.clone(), v.clone())).collect(),
        before: Some(row.clone()),
        after: Some(row),
        unchanged: vec![],
        position: Position::Pg { commit_lsn: 1, seq: 0 },
        version: Version::from_u64(1),
        commit_time: None,
        tx: Some(1),
        origin: None,
    };
    let event = Value::Map(vec![("kind".into(), Value::Text("x".into()))]);
    let _ = t.render(&ChangeScope { change: &change, event: Some(&event) });
});
