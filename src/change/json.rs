//! Two JSON forms of values and changes.
//!
//! * **Natural** JSON is what sinks write (a cached row, a search document): a decimal is a
//!   JSON number written with the source's exact digits, bytes are base64, JSON columns are
//!   embedded verbatim. Values JSON cannot carry (NaN, infinities, `NaN` numerics) are an
//!   error, which sends the change to the DLQ instead of writing something false.
//! * **Typed** JSON is what the dead-letter queue stores: lossless, so `dlq replay` rebuilds the
//!   exact change. Text is a JSON string, integers are numbers, everything else is an object
//!   tagged with `$type`.

use std::fmt::Write as _;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value as J, json};

use super::{Change, Name, Op, Position, Row, Value, Version};

/// A value that natural JSON cannot represent faithfully.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct JsonError {
    /// Column (or path) of the value.
    pub field: String,
    /// Why.
    pub reason: String,
}

fn push_str(out: &mut String, s: &str) {
    // serde_json's escaping, without building a serde_json::Value.
    let _ = serde_json::to_writer(string_writer(out), s);
}

/// Adapter so serde_json can write into a String; serde_json only ever writes valid UTF-8.
fn string_writer(out: &mut String) -> impl std::io::Write + '_ {
    struct W<'a>(&'a mut String);
    impl std::io::Write for W<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push_str(std::str::from_utf8(buf).map_err(std::io::Error::other)?);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    W(out)
}

/// True if `s` is a JSON number literal (so a decimal can be written as-is).
fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1
            }
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1
        }
        if i == start {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1
        }
        if i == start {
            return false;
        }
    }
    i == b.len()
}

/// Append the natural JSON of a value.
pub fn write_natural(out: &mut String, v: &Value, field: &str) -> Result<(), JsonError> {
    let err = |reason: String| JsonError { field: field.to_string(), reason };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float(f) => {
            if !f.is_finite() {
                return Err(err(format!("float {f} has no JSON form (the pipeline's non_finite = \"reject\")")));
            }
            // Shortest round-trip form, always with a fraction or an exponent (`1.0`, `3.4e38`),
            // so a search index maps the field as floating point, never as an integer.
            let _ = serde_json::to_writer(string_writer(out), f);
        }
        Value::Decimal(d) => {
            if !is_json_number(d) {
                return Err(err(format!("numeric {d} has no JSON form (the pipeline's non_finite = \"reject\")")));
            }
            out.push_str(d);
        }
        Value::Text(s) | Value::Uuid(s) => push_str(out, s),
        Value::Other { text, .. } => push_str(out, text),
        Value::Json(s) => out.push_str(s),
        Value::Bytes(b) => push_str(out, &B64.encode(b)),
        Value::Timestamp(t) => push_str(out, &t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        Value::Date(d) => push_str(out, &d.to_string()),
        Value::List(items) | Value::Set(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_natural(out, item, field)?;
            }
            out.push(']');
        }
        Value::Map(m) => {
            out.push('{');
            for (i, (k, item)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_str(out, k);
                out.push(':');
                write_natural(out, item, field)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

/// Natural JSON object of a row, optionally restricted to `columns` (in that order).
pub fn row_to_natural(row: &Row, columns: Option<&[String]>) -> Result<String, JsonError> {
    let mut out = String::with_capacity(64 + row.len() * 24);
    out.push('{');
    let mut first = true;
    let mut field = |out: &mut String, name: &str, v: &Value| -> Result<(), JsonError> {
        if !first {
            out.push(',');
        }
        first = false;
        push_str(out, name);
        out.push(':');
        write_natural(out, v, name)
    };
    match columns {
        Some(cols) => {
            for c in cols {
                if let Some(v) = row.get(c) {
                    field(&mut out, c, v)?;
                }
            }
        }
        None => {
            for (n, v) in row.iter() {
                field(&mut out, n, v)?;
            }
        }
    }
    out.push('}');
    Ok(out)
}

/// Lossless JSON of a value (for the DLQ).
pub fn value_to_typed(v: &Value) -> J {
    let tagged = |t: &str, v: J| json!({ "$type": t, "v": v });
    match v {
        Value::Null => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::Text(s) => J::String(s.clone()),
        Value::Float(f) => tagged("float", if f.is_finite() { json!(f) } else { J::String(f.to_string()) }),
        Value::Decimal(d) => tagged("decimal", J::String(d.clone())),
        Value::Json(s) => tagged("json", J::String(s.clone())),
        Value::Bytes(b) => tagged("bytes", J::String(B64.encode(b))),
        Value::Timestamp(t) => tagged("timestamp", J::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))),
        Value::Date(d) => tagged("date", J::String(d.to_string())),
        Value::Uuid(u) => tagged("uuid", J::String(u.clone())),
        Value::List(l) => tagged("list", J::Array(l.iter().map(value_to_typed).collect())),
        Value::Set(l) => tagged("set", J::Array(l.iter().map(value_to_typed).collect())),
        Value::Map(m) => tagged(
            "map",
            J::Array(m.iter().map(|(k, v)| J::Array(vec![J::String(k.clone()), value_to_typed(v)])).collect()),
        ),
        Value::Other { type_name, text } => {
            json!({ "$type": "other", "type_name": type_name, "v": text })
        }
    }
}

/// Inverse of [`value_to_typed`].
pub fn value_from_typed(j: &J) -> Result<Value, String> {
    Ok(match j {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => Value::Int(n.as_i64().ok_or_else(|| format!("integer {n} out of range"))?),
        J::String(s) => Value::Text(s.clone()),
        J::Array(_) => return Err("untagged array".into()),
        J::Object(o) => {
            let t = o.get("$type").and_then(J::as_str).ok_or("object without $type")?;
            let v = o.get("v").ok_or("tagged value without v")?;
            let s = || v.as_str().map(str::to_string).ok_or_else(|| format!("{t}: v must be a string"));
            let arr = || v.as_array().ok_or_else(|| format!("{t}: v must be an array"));
            match t {
                "float" => Value::Float(match v {
                    J::Number(n) => n.as_f64().ok_or("bad float")?,
                    J::String(x) => x.parse().map_err(|_| format!("bad float {x}"))?,
                    _ => return Err("bad float".into()),
                }),
                "decimal" => Value::Decimal(s()?),
                "json" => Value::Json(s()?),
                "bytes" => Value::Bytes(B64.decode(s()?).map_err(|e| e.to_string())?),
                "timestamp" => Value::Timestamp(
                    DateTime::parse_from_rfc3339(&s()?).map_err(|e| e.to_string())?.with_timezone(&Utc),
                ),
                "date" => Value::Date(NaiveDate::parse_from_str(&s()?, "%Y-%m-%d").map_err(|e| e.to_string())?),
                "uuid" => Value::Uuid(s()?),
                "list" => Value::List(arr()?.iter().map(value_from_typed).collect::<Result<_, _>>()?),
                "set" => Value::Set(arr()?.iter().map(value_from_typed).collect::<Result<_, _>>()?),
                "map" => Value::Map(
                    arr()?
                        .iter()
                        .map(|pair| {
                            let k = pair.get(0).and_then(J::as_str).ok_or("map key")?;
                            Ok((k.to_string(), value_from_typed(pair.get(1).ok_or("map value")?)?))
                        })
                        .collect::<Result<_, String>>()?,
                ),
                "other" => Value::Other {
                    type_name: o.get("type_name").and_then(J::as_str).unwrap_or("unknown").to_string(),
                    text: s()?,
                },
                other => return Err(format!("unknown $type {other}")),
            }
        }
    })
}

fn row_to_typed(r: &Row) -> J {
    J::Array(r.iter().map(|(n, v)| J::Array(vec![J::String(n.to_string()), value_to_typed(v)])).collect())
}

fn row_from_typed(j: &J) -> Result<Row, String> {
    let arr = j.as_array().ok_or("row must be an array of [name, value]")?;
    arr.iter()
        .map(|pair| {
            let n = pair.get(0).and_then(J::as_str).ok_or("row field name")?;
            Ok((Name::from(n), value_from_typed(pair.get(1).ok_or("row field value")?)?))
        })
        .collect()
}

/// Lossless JSON of a whole change.
pub fn change_to_typed(c: &Change) -> J {
    let mut m = Map::new();
    m.insert("source".into(), J::String(c.source.to_string()));
    m.insert("relation".into(), J::String(c.relation.to_string()));
    m.insert("op".into(), J::String(c.op.as_str().into()));
    m.insert("key".into(), row_to_typed(&c.key));
    m.insert("before".into(), c.before.as_ref().map(row_to_typed).unwrap_or(J::Null));
    m.insert("after".into(), c.after.as_ref().map(row_to_typed).unwrap_or(J::Null));
    m.insert("unchanged".into(), J::Array(c.unchanged.iter().map(|n| J::String(n.to_string())).collect()));
    m.insert(
        "position".into(),
        match &c.position {
            Position::Pg { commit_lsn, seq } => {
                json!({ "pg": { "commit_lsn": commit_lsn.to_string(), "seq": seq } })
            }
            Position::Ddb { shard, sequence } => {
                json!({ "ddb": { "shard": shard.to_string(), "sequence": sequence.to_string() } })
            }
            Position::Snapshot { at, chunk } => {
                json!({ "snapshot": { "at": at.to_string(), "chunk": chunk } })
            }
        },
    );
    m.insert("version".into(), J::String(c.version.to_string()));
    m.insert(
        "commit_time".into(),
        c.commit_time.map(|t| J::String(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))).unwrap_or(J::Null),
    );
    m.insert("tx".into(), c.tx.map(J::from).unwrap_or(J::Null));
    m.insert("origin".into(), c.origin.as_ref().map(|o| J::String(o.to_string())).unwrap_or(J::Null));
    if c.key_changed {
        m.insert("key_changed".into(), J::Bool(true));
    }
    J::Object(m)
}

/// Inverse of [`change_to_typed`].
pub fn change_from_typed(j: &J) -> Result<Change, String> {
    let s = |k: &str| j.get(k).and_then(J::as_str).ok_or_else(|| format!("change.{k} missing"));
    let opt_row = |k: &str| -> Result<Option<Row>, String> {
        match j.get(k) {
            None | Some(J::Null) => Ok(None),
            Some(r) => row_from_typed(r).map(Some),
        }
    };
    let version = Version::parse_decimal(s("version")?).ok_or("change.version is not a number")?;
    let pos = j.get("position").ok_or("change.position missing")?;
    let position = if let Some(p) = pos.get("pg") {
        Position::Pg {
            commit_lsn: p.get("commit_lsn").and_then(J::as_str).and_then(|x| x.parse().ok()).ok_or("pg.commit_lsn")?,
            seq: p.get("seq").and_then(J::as_u64).ok_or("pg.seq")? as u32,
        }
    } else if let Some(p) = pos.get("ddb") {
        Position::Ddb {
            shard: Arc::from(p.get("shard").and_then(J::as_str).ok_or("ddb.shard")?),
            sequence: p.get("sequence").and_then(J::as_str).and_then(Version::parse_decimal).ok_or("ddb.sequence")?,
        }
    } else if let Some(p) = pos.get("snapshot") {
        Position::Snapshot {
            at: p.get("at").and_then(J::as_str).and_then(Version::parse_decimal).ok_or("snapshot.at")?,
            chunk: p.get("chunk").and_then(J::as_u64).ok_or("snapshot.chunk")?,
        }
    } else {
        return Err("unknown position".into());
    };
    Ok(Change {
        source: Arc::from(s("source")?),
        relation: Arc::from(s("relation")?),
        op: Op::parse(s("op")?).ok_or("change.op")?,
        key: row_from_typed(j.get("key").ok_or("change.key missing")?)?,
        before: opt_row("before")?,
        after: opt_row("after")?,
        unchanged: j
            .get("unchanged")
            .and_then(J::as_array)
            .map(|a| a.iter().filter_map(J::as_str).map(Name::from).collect())
            .unwrap_or_default(),
        position,
        version,
        commit_time: match j.get("commit_time").and_then(J::as_str) {
            Some(t) => Some(DateTime::parse_from_rfc3339(t).map_err(|e| e.to_string())?.with_timezone(&Utc)),
            None => None,
        },
        tx: j.get("tx").and_then(J::as_u64).map(|x| x as u32),
        origin: j.get("origin").and_then(J::as_str).map(Name::from),
        key_changed: j.get("key_changed").and_then(J::as_bool).unwrap_or(false),
    })
}

/// The typed form of a change written straight to a serializer, without building the
/// [`change_to_typed`] tree first: the spool encodes every record of a sink that is behind, and
/// the intermediate `Value` was most of that cost. Equal to `change_to_typed` as JSON.
pub struct TypedChange<'a>(pub &'a Change);

struct TypedRow<'a>(&'a Row);
struct TypedValue<'a>(&'a Value);
struct Tagged<'a, T: serde::Serialize>(&'a str, T);
struct TypedPosition<'a>(&'a Position);

impl serde::Serialize for TypedChange<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let c = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("source", &*c.source)?;
        m.serialize_entry("relation", &*c.relation)?;
        m.serialize_entry("op", c.op.as_str())?;
        m.serialize_entry("key", &TypedRow(&c.key))?;
        m.serialize_entry("before", &c.before.as_ref().map(TypedRow))?;
        m.serialize_entry("after", &c.after.as_ref().map(TypedRow))?;
        m.serialize_entry("unchanged", &c.unchanged.iter().map(|n| &**n).collect::<Vec<&str>>())?;
        m.serialize_entry("position", &TypedPosition(&c.position))?;
        m.serialize_entry("version", &c.version.to_string())?;
        m.serialize_entry(
            "commit_time",
            &c.commit_time.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        )?;
        m.serialize_entry("tx", &c.tx)?;
        m.serialize_entry("origin", &c.origin.as_deref())?;
        if c.key_changed {
            m.serialize_entry("key_changed", &true)?;
        }
        m.end()
    }
}

impl serde::Serialize for TypedRow<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (n, v) in self.0.iter() {
            seq.serialize_element(&(&**n, TypedValue(v)))?;
        }
        seq.end()
    }
}

impl<T: serde::Serialize> serde::Serialize for Tagged<'_, T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("$type", self.0)?;
        m.serialize_entry("v", &self.1)?;
        m.end()
    }
}

impl serde::Serialize for TypedValue<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.0 {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Text(t) => s.serialize_str(t),
            Value::Float(f) if f.is_finite() => Tagged("float", *f).serialize(s),
            Value::Float(f) => Tagged("float", f.to_string()).serialize(s),
            Value::Decimal(d) => Tagged("decimal", d).serialize(s),
            Value::Json(j) => Tagged("json", j).serialize(s),
            Value::Bytes(b) => Tagged("bytes", B64.encode(b)).serialize(s),
            Value::Timestamp(t) => {
                Tagged("timestamp", t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)).serialize(s)
            }
            Value::Date(d) => Tagged("date", d.to_string()).serialize(s),
            Value::Uuid(u) => Tagged("uuid", u).serialize(s),
            Value::List(l) => Tagged("list", l.iter().map(TypedValue).collect::<Vec<_>>()).serialize(s),
            Value::Set(l) => Tagged("set", l.iter().map(TypedValue).collect::<Vec<_>>()).serialize(s),
            Value::Map(m) => {
                Tagged("map", m.iter().map(|(k, v)| (k.as_str(), TypedValue(v))).collect::<Vec<_>>()).serialize(s)
            }
            Value::Other { type_name, text } => {
                let mut m = s.serialize_map(Some(3))?;
                m.serialize_entry("$type", "other")?;
                m.serialize_entry("type_name", type_name)?;
                m.serialize_entry("v", text)?;
                m.end()
            }
        }
    }
}

impl serde::Serialize for TypedPosition<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        match self.0 {
            Position::Pg { commit_lsn, seq } => {
                m.serialize_entry("pg", &json!({ "commit_lsn": commit_lsn.to_string(), "seq": seq }))?
            }
            Position::Ddb { shard, sequence } => {
                m.serialize_entry("ddb", &json!({ "shard": &**shard, "sequence": sequence.to_string() }))?
            }
            Position::Snapshot { at, chunk } => {
                m.serialize_entry("snapshot", &json!({ "at": at.to_string(), "chunk": chunk }))?
            }
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Change {
        let mut after = Row::default();
        after.push("id".into(), Value::Int(1));
        after.push("price".into(), Value::Decimal("12.3400".into()));
        after.push("doc".into(), Value::Json(r#"{"n": 1.10}"#.into()));
        after.push("bin".into(), Value::Bytes(vec![0, 1, 255]));
        after.push("tags".into(), Value::Set(vec![Value::Text("a".into())]));
        after.push("m".into(), Value::Map(vec![("x".into(), Value::Float(f64::NAN))]));
        after.push("ip".into(), Value::Other { type_name: "inet".into(), text: "::1".into() });
        let mut key = Row::default();
        key.push("id".into(), Value::Int(1));
        Change {
            source: "s".into(),
            relation: "public.t".into(),
            op: Op::Update,
            key,
            before: None,
            after: Some(after),
            unchanged: vec!["big".into()],
            position: Position::Pg { commit_lsn: 42, seq: 3 },
            version: Version::from_u64(42),
            commit_time: Some(DateTime::parse_from_rfc3339("2024-01-01T00:00:00.5Z").unwrap().with_timezone(&Utc)),
            tx: Some(9),
            origin: None,
            key_changed: false,
        }
    }

    #[test]
    fn the_streamed_typed_form_equals_the_tree() {
        let mut c = sample();
        c.before = c.after.clone();
        c.key_changed = true;
        c.origin = Some("o".into());
        let mut extra = Row::default();
        extra.push("f".into(), Value::Float(1.5));
        extra.push("inf".into(), Value::Float(f64::INFINITY));
        extra.push("ts".into(), Value::Timestamp(c.commit_time.unwrap()));
        extra.push("d".into(), Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()));
        extra.push("u".into(), Value::Uuid("00000000-0000-0000-0000-000000000001".into()));
        extra.push("l".into(), Value::List(vec![Value::Null, Value::Bool(true), Value::Int(-3)]));
        extra.push("t".into(), Value::Text("x".into()));
        c.key = extra;
        for position in [
            Position::Pg { commit_lsn: 42, seq: 3 },
            Position::Ddb { shard: "sh".into(), sequence: Version::from_u64(7) },
            Position::Snapshot { at: Version::from_u64(8), chunk: 2 },
        ] {
            c.position = position;
            assert_eq!(serde_json::to_value(TypedChange(&c)).unwrap(), change_to_typed(&c));
        }
    }

    #[test]
    fn typed_round_trip_is_lossless() {
        let c = sample();
        let back = change_from_typed(&change_to_typed(&c)).unwrap();
        assert_eq!(back.key, c.key);
        let (a, b) = (back.after.unwrap(), c.after.unwrap());
        assert_eq!(a.len(), b.len());
        for ((n1, v1), (n2, v2)) in a.iter().zip(b.iter()) {
            assert_eq!(n1, n2);
            match (v1, v2) {
                (Value::Map(x), Value::Map(y)) => {
                    assert!(
                        matches!(x[0].1, Value::Float(f) if f.is_nan())
                            && matches!(y[0].1, Value::Float(f) if f.is_nan())
                    )
                }
                _ => assert_eq!(v1, v2),
            }
        }
        assert_eq!(back.unchanged, c.unchanged);
        assert_eq!(back.position, c.position);
        assert_eq!(back.commit_time, c.commit_time);
    }

    #[test]
    fn natural_json_keeps_decimal_digits_and_refuses_nan() {
        let mut r = Row::default();
        r.push("price".into(), Value::Decimal("12.3400".into()));
        r.push("doc".into(), Value::Json(r#"{"n": 1.10}"#.into()));
        r.push("name".into(), Value::Text("a \"quoted\" ünïcode".into()));
        assert_eq!(
            row_to_natural(&r, None).unwrap(),
            r#"{"price":12.3400,"doc":{"n": 1.10},"name":"a \"quoted\" ünïcode"}"#
        );
        let mut bad = Row::default();
        bad.push("x".into(), Value::Decimal("NaN".into()));
        assert_eq!(row_to_natural(&bad, None).unwrap_err().field, "x");
        assert!(
            is_json_number("-0.5e+10") && !is_json_number("01") && !is_json_number("1.") && !is_json_number("Infinity")
        );
    }
}
