//! PostgreSQL text output → [`Value`], exactly.
//!
//! The replication connection asks for `DateStyle=ISO`, `TimeZone=UTC`,
//! `extra_float_digits=3` and `bytea_output=hex`, so the text forms parsed here are fixed.
//! `numeric` stays a decimal string; a type we do not decode (or a value such as
//! `infinity` that has no counterpart) arrives as [`Value::Other`] with its type name.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

use crate::change::Value;

/// Well-known type OIDs (`pg_type.oid`, stable across versions).
pub mod oid {
    #![allow(missing_docs)]
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// Element type of the array types we decode into lists.
fn array_element(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => oid::INT8,
        1009 => oid::TEXT,
        1014 => oid::BPCHAR,
        1015 => oid::VARCHAR,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1231 => oid::NUMERIC,
        2951 => oid::UUID,
        199 => oid::JSON,
        3807 => oid::JSONB,
        1182 => oid::DATE,
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        _ => return None,
    })
}

/// The name a type is known by in values kept as text: bare for built-in types and types in
/// `public`, schema-qualified otherwise. The stream (Type messages) and snapshots (the
/// catalog) both name types through this, so a value's identity never depends on the path.
pub fn qualified_type_name(namespace: &str, name: &str) -> String {
    if namespace == "pg_catalog" || namespace == "public" { name.to_string() } else { format!("{namespace}.{name}") }
}

/// Convert a column's text form. `type_name` is used for values kept as [`Value::Other`].
pub fn text_to_value(type_oid: u32, type_name: &str, text: &[u8]) -> Value {
    let Ok(s) = std::str::from_utf8(text) else {
        // The server sends UTF-8 (client_encoding); anything else is kept byte-exact.
        return Value::Bytes(text.to_vec());
    };
    let other = || Value::Other { type_name: type_name.to_string(), text: s.to_string() };
    match type_oid {
        oid::BOOL => match s {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => other(),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => s.parse().map(Value::Int).unwrap_or_else(|_| other()),
        oid::FLOAT4 | oid::FLOAT8 => match s {
            "NaN" => Value::Float(f64::NAN),
            "Infinity" => Value::Float(f64::INFINITY),
            "-Infinity" => Value::Float(f64::NEG_INFINITY),
            _ => s.parse().map(Value::Float).unwrap_or_else(|_| other()),
        },
        oid::NUMERIC => Value::Decimal(s.to_string()),
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::CHAR => Value::Text(s.to_string()),
        oid::JSON | oid::JSONB => Value::Json(s.to_string()),
        oid::UUID => Value::Uuid(s.to_string()),
        oid::BYTEA => match s.strip_prefix("\\x").and_then(|h| hex::decode(h).ok()) {
            Some(b) => Value::Bytes(b),
            None => other(),
        },
        oid::DATE => NaiveDate::parse_from_str(s, "%Y-%m-%d").map(Value::Date).unwrap_or_else(|_| other()),
        oid::TIMESTAMP => NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
            .map(|t| Value::Timestamp(t.and_utc()))
            .unwrap_or_else(|_| other()),
        oid::TIMESTAMPTZ => parse_timestamptz(s).map(Value::Timestamp).unwrap_or_else(other),
        t => match array_element(t) {
            Some(elem) => parse_array(s, elem, type_name.trim_start_matches('_')).unwrap_or_else(other),
            None => other(),
        },
    }
}

fn parse_timestamptz(s: &str) -> Option<DateTime<Utc>> {
    // ISO output: `2024-01-02 03:04:05.123456+00`; the offset may carry minutes (`+05:30`).
    let sign = s.get(11..)?.rfind(['+', '-'])? + 11;
    let offset = &s[sign + 1..];
    let full = if offset.len() == 2 { format!("{s}:00") } else { s.to_string() };
    DateTime::parse_from_str(&full, "%Y-%m-%d %H:%M:%S%.f%:z").ok().map(|t| t.with_timezone(&Utc))
}

/// One-dimensional array literal (`{1,2,NULL,"a \"b\""}`) → list. Multi-dimensional arrays
/// and arrays with explicit bounds are left to the caller's fallback.
fn parse_array(s: &str, elem: u32, elem_name: &str) -> Option<Value> {
    let inner = s.strip_prefix('{')?.strip_suffix('}')?;
    let mut items = Vec::new();
    if inner.is_empty() {
        return Some(Value::List(items));
    }
    let mut chars = inner.chars().peekable();
    loop {
        let mut item = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => item.push(chars.next()?),
                    '"' => break,
                    c => item.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' || c == '"' {
                    return None;
                }
                item.push(c);
                chars.next();
            }
        }
        items.push(if !quoted && item == "NULL" {
            Value::Null
        } else {
            text_to_value(elem, elem_name, item.as_bytes())
        });
        match chars.next() {
            None => break,
            Some(',') => continue,
            Some(_) => return None,
        }
    }
    Some(Value::List(items))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_stay_exact() {
        assert_eq!(
            text_to_value(oid::NUMERIC, "numeric", b"12345678901234567890.000000000001"),
            Value::Decimal("12345678901234567890.000000000001".into())
        );
        assert_eq!(text_to_value(oid::NUMERIC, "numeric", b"NaN"), Value::Decimal("NaN".into()));
        assert_eq!(text_to_value(oid::INT8, "int8", b"-9223372036854775808"), Value::Int(i64::MIN));
        assert!(matches!(text_to_value(oid::FLOAT8, "float8", b"NaN"), Value::Float(f) if f.is_nan()));
    }

    #[test]
    fn times_and_bytes() {
        let Value::Timestamp(t) = text_to_value(oid::TIMESTAMPTZ, "timestamptz", b"2024-01-02 03:04:05.123456+00")
        else {
            panic!("not a timestamp")
        };
        assert_eq!(t.to_rfc3339(), "2024-01-02T03:04:05.123456+00:00");
        let Value::Timestamp(t) = text_to_value(oid::TIMESTAMPTZ, "timestamptz", b"2024-01-02 08:34:05+05:30") else {
            panic!("not a timestamp")
        };
        assert_eq!(t.to_rfc3339(), "2024-01-02T03:04:05+00:00");
        assert_eq!(
            text_to_value(oid::TIMESTAMPTZ, "timestamptz", b"infinity"),
            Value::Other { type_name: "timestamptz".into(), text: "infinity".into() }
        );
        assert_eq!(text_to_value(oid::BYTEA, "bytea", b"\\x00ff"), Value::Bytes(vec![0, 255]));
    }

    #[test]
    fn unknown_types_keep_their_name() {
        assert_eq!(
            text_to_value(869, "inet", b"10.0.0.1/32"),
            Value::Other { type_name: "inet".into(), text: "10.0.0.1/32".into() }
        );
    }

    #[test]
    fn arrays() {
        assert_eq!(
            text_to_value(1007, "_int4", b"{1,NULL,3}"),
            Value::List(vec![Value::Int(1), Value::Null, Value::Int(3)])
        );
        assert_eq!(
            text_to_value(1009, "_text", br#"{"a,b","q\"x",NULL,"NULL"}"#),
            Value::List(vec![
                Value::Text("a,b".into()),
                Value::Text("q\"x".into()),
                Value::Null,
                Value::Text("NULL".into())
            ])
        );
        assert!(matches!(text_to_value(1007, "_int4", b"{{1,2},{3,4}}"), Value::Other { .. }));
    }
}
