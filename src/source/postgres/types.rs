//! PostgreSQL text output → [`Value`], exactly, for every type.
//!
//! Both connections pin `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=postgres`,
//! `extra_float_digits=3`, `bytea_output=hex` and `lc_monetary=C`
//! ([`super::config::SESSION_OPTIONS`]), so the text forms parsed here are fixed and the
//! snapshot and the stream see the same bytes. The forms (docs/types.md):
//!
//! * `bool`, integers, `oid` → booleans and integers; `float4`/`float8` → floats (NaN and
//!   ±Infinity kept as such; the pipeline's `non_finite` decides their written form);
//! * `numeric` → an exact decimal (also `NaN`, `±Infinity`); `money` → an exact decimal;
//! * `date`, `timestamp`, `timestamptz` → calendar values, BC years included (astronomical
//!   numbering); `±infinity` stays text with its type name;
//! * arrays of any element type and any number of dimensions → nested lists, NULL elements
//!   as nulls (explicit lower bounds are not kept);
//! * a domain → the form of its base type;
//! * everything else (interval, time, timetz, uuid-like network types, bit strings, ranges,
//!   multiranges, enums, composites, hstore, xml, tsvector, geometric types …) → its exact
//!   text output with its type name ([`Value::Other`]).

use std::collections::HashMap;
use std::sync::Arc;

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
    pub const BOX: u32 = 603;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const MONEY: u32 = 790;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// Element type of the built-in array types, for when no catalog was read (tests, and a
/// type the catalog does not know yet).
fn builtin_array_element(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1002 => oid::CHAR,
        1003 => oid::NAME,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => oid::INT8,
        1028 => oid::OID,
        1009 => oid::TEXT,
        1014 => oid::BPCHAR,
        1015 => oid::VARCHAR,
        1020 => oid::BOX,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        791 => oid::MONEY,
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

/// What start-up read from `pg_type`: names, domains' base types and arrays' element types,
/// so a column of any type (a domain over an array of a domain, say) is decoded by the same
/// rule in the snapshot and the stream.
#[derive(Debug, Default, Clone)]
pub struct Types {
    names: HashMap<u32, String>,
    domain_bases: HashMap<u32, u32>,
    array_elements: HashMap<u32, u32>,
}

impl Types {
    /// Record one `pg_type` row: `base` is `typbasetype` (0 unless a domain), `element` is
    /// `typelem` of an array type (0 otherwise).
    pub fn insert(&mut self, oid: u32, name: String, base: u32, element: u32) {
        self.names.insert(oid, name);
        if base != 0 {
            self.domain_bases.insert(oid, base);
        }
        if element != 0 {
            self.array_elements.insert(oid, element);
        }
    }

    /// The name of a type, if the catalog knows it.
    pub fn name(&self, oid: u32) -> Option<&str> {
        self.names.get(&oid).map(String::as_str)
    }

    /// The type a domain's values take (through domains over domains); other types unchanged.
    pub fn decoding_type(&self, oid: u32) -> u32 {
        let mut t = oid;
        for _ in 0..16 {
            match self.domain_bases.get(&t) {
                Some(b) => t = *b,
                None => break,
            }
        }
        t
    }

    fn element(&self, array: u32) -> Option<u32> {
        self.array_elements.get(&array).copied().or_else(|| builtin_array_element(array))
    }

    /// How a column of type `declared` (named `name` in values kept as text) is decoded.
    pub fn column(&self, declared: u32, name: Arc<str>) -> ColumnType {
        let oid = self.decoding_type(declared);
        let element = self.element(oid).map(|e| {
            let name = self.name(e).map(Arc::from).unwrap_or_else(|| Arc::from(format!("oid {e}")));
            (self.decoding_type(e), name)
        });
        ColumnType { oid, name, element }
    }
}

/// How one column's text is decoded, resolved once per column from the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnType {
    /// The type values are decoded as: the column's own type, or a domain's base type.
    pub oid: u32,
    /// The name values kept as text carry.
    pub name: Arc<str>,
    /// For an array type: the element's decoding type and name.
    pub element: Option<(u32, Arc<str>)>,
}

impl ColumnType {
    /// A column of a type decoded without a catalog (built-in types only).
    pub fn builtin(oid: u32, name: &str) -> Self {
        Types::default().column(oid, Arc::from(name))
    }

    /// Decode one value's text.
    pub fn decode(&self, text: &[u8]) -> Value {
        match &self.element {
            Some((elem, elem_name)) => {
                let Ok(s) = std::str::from_utf8(text) else { return Value::Bytes(text.to_vec()) };
                let delimiter = if *elem == oid::BOX { ';' } else { ',' };
                parse_array(s, delimiter, &|item| text_to_value(*elem, elem_name, item.as_bytes()))
                    .unwrap_or_else(|| Value::Other { type_name: self.name.to_string(), text: s.to_string() })
            }
            None => text_to_value(self.oid, &self.name, text),
        }
    }
}

/// Convert a scalar's text form. `type_name` is used for values kept as [`Value::Other`].
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
        oid::MONEY => money(s).map(Value::Decimal).unwrap_or_else(other),
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::CHAR => Value::Text(s.to_string()),
        oid::JSON | oid::JSONB => Value::Json(s.to_string()),
        oid::UUID => Value::Uuid(s.to_string()),
        oid::BYTEA => match s.strip_prefix("\\x").and_then(|h| hex::decode(h).ok()) {
            Some(b) => Value::Bytes(b),
            None => other(),
        },
        oid::DATE => parse_date(s).map(Value::Date).unwrap_or_else(other),
        oid::TIMESTAMP => parse_timestamp(s).map(Value::Timestamp).unwrap_or_else(other),
        oid::TIMESTAMPTZ => parse_timestamptz(s).map(Value::Timestamp).unwrap_or_else(other),
        _ => other(),
    }
}

/// `money` under `lc_monetary=C`: `$1,234.56`, `-$1,234.56` → `1234.56`, `-1234.56`.
fn money(s: &str) -> Option<String> {
    let (sign, rest) = match s.strip_prefix('-') {
        Some(r) => ("-", r),
        None => ("", s),
    };
    let digits: String = rest.strip_prefix('$')?.chars().filter(|c| *c != ',').collect();
    let ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.matches('.').count() <= 1
        && !digits.starts_with('.')
        && !digits.ends_with('.');
    ok.then(|| format!("{sign}{digits}"))
}

/// PostgreSQL's ISO date (`2024-01-02`, `12345-01-02`, `0044-03-15 BC`) → a date with the
/// astronomical year (1 BC is year 0), the numbering ISO 8601 and chrono use. Built from its
/// fields, so 29 February of a BC leap year and years past 9999 parse too.
fn parse_date_part(s: &str, bc: bool) -> Option<NaiveDate> {
    let mut parts = s.splitn(3, '-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if y.len() < 4 || !y.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i32 = y.parse().ok()?;
    NaiveDate::from_ymd_opt(if bc { 1 - year } else { year }, m.parse().ok()?, d.parse().ok()?)
}

fn split_era(s: &str) -> (&str, bool) {
    match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    }
}

fn parse_date(s: &str) -> Option<NaiveDate> {
    let (s, bc) = split_era(s);
    parse_date_part(s, bc)
}

/// `2024-01-02 03:04:05.123456` (optionally ` BC`) → date-time.
fn parse_naive(s: &str, bc: bool) -> Option<NaiveDateTime> {
    let (date, time) = s.split_once(' ')?;
    let time = chrono::NaiveTime::parse_from_str(time, "%H:%M:%S%.f").ok()?;
    Some(parse_date_part(date, bc)?.and_time(time))
}

fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    let (s, bc) = split_era(s);
    Some(parse_naive(s, bc)?.and_utc())
}

fn parse_timestamptz(s: &str) -> Option<DateTime<Utc>> {
    // ISO output: `2024-01-02 03:04:05.123456+00`; the offset may carry minutes (`+05:30`) or
    // seconds (`+00:53:28`).
    let (s, bc) = split_era(s);
    let (date, rest) = s.split_once(' ')?;
    let at = rest.rfind(['+', '-'])?;
    let (time, offset) = rest.split_at(at);
    let sign: i32 = if offset.starts_with('-') { -1 } else { 1 };
    let mut fields = offset[1..].split(':');
    let mut secs = 0i32;
    for (i, unit) in [3600, 60, 1].into_iter().enumerate() {
        match fields.next() {
            Some(f) if f.len() == 2 => secs += f.parse::<i32>().ok()? * unit,
            Some(_) => return None,
            None if i > 0 => break,
            None => return None,
        }
    }
    let local = parse_naive(&format!("{date} {time}"), bc)?;
    Some((local - chrono::Duration::seconds(i64::from(sign * secs))).and_utc())
}

/// An array literal of any number of dimensions (`{{1,2},{3,NULL}}`, `[0:1]={a,b}`) → nested
/// lists, each element converted by `element`. `None` for text that is not an array literal.
fn parse_array(s: &str, delimiter: char, element: &dyn Fn(&str) -> Value) -> Option<Value> {
    // Explicit bounds (`[2:3]={…}`) are printed only when a lower bound is not 1.
    let body = if s.starts_with('[') { &s[s.find('=')? + 1..] } else { s };
    let mut chars = body.chars().peekable();
    let v = parse_level(&mut chars, delimiter, element)?;
    chars.next().is_none().then_some(v)
}

fn parse_level(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    delimiter: char,
    element: &dyn Fn(&str) -> Value,
) -> Option<Value> {
    if chars.next()? != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
        return Some(Value::List(items));
    }
    loop {
        match chars.peek()? {
            '{' => items.push(parse_level(chars, delimiter, element)?),
            '"' => {
                chars.next();
                let mut item = String::new();
                loop {
                    match chars.next()? {
                        '\\' => item.push(chars.next()?),
                        '"' => break,
                        c => item.push(c),
                    }
                }
                items.push(element(&item));
            }
            _ => {
                let mut item = String::new();
                while let Some(&c) = chars.peek() {
                    if c == delimiter || c == '}' {
                        break;
                    }
                    if c == '{' || c == '"' {
                        return None;
                    }
                    item.push(c);
                    chars.next();
                }
                items.push(if item == "NULL" { Value::Null } else { element(&item) });
            }
        }
        match chars.next()? {
            '}' => return Some(Value::List(items)),
            c if c == delimiter => continue,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin(oid: u32, name: &str, text: &str) -> Value {
        ColumnType::builtin(oid, name).decode(text.as_bytes())
    }

    #[test]
    fn numbers_stay_exact() {
        assert_eq!(
            text_to_value(oid::NUMERIC, "numeric", b"12345678901234567890.000000000001"),
            Value::Decimal("12345678901234567890.000000000001".into())
        );
        assert_eq!(text_to_value(oid::NUMERIC, "numeric", b"NaN"), Value::Decimal("NaN".into()));
        assert_eq!(text_to_value(oid::NUMERIC, "numeric", b"-Infinity"), Value::Decimal("-Infinity".into()));
        assert_eq!(text_to_value(oid::INT8, "int8", b"-9223372036854775808"), Value::Int(i64::MIN));
        assert!(matches!(text_to_value(oid::FLOAT8, "float8", b"NaN"), Value::Float(f) if f.is_nan()));
        assert_eq!(text_to_value(oid::FLOAT4, "float4", b"3.4e+38"), Value::Float(3.4e38));
        assert_eq!(text_to_value(oid::MONEY, "money", b"-$1,234,567.89"), Value::Decimal("-1234567.89".into()));
        assert_eq!(text_to_value(oid::MONEY, "money", b"$0.00"), Value::Decimal("0.00".into()));
    }

    #[test]
    fn times_bc_far_future_and_infinite() {
        let Value::Timestamp(t) = text_to_value(oid::TIMESTAMPTZ, "timestamptz", b"2024-01-02 03:04:05.123456+00")
        else {
            panic!("not a timestamp")
        };
        assert_eq!(t.to_rfc3339(), "2024-01-02T03:04:05.123456+00:00");
        let Value::Timestamp(t) = text_to_value(oid::TIMESTAMPTZ, "timestamptz", b"2024-01-02 08:34:05+05:30") else {
            panic!("not a timestamp")
        };
        assert_eq!(t.to_rfc3339(), "2024-01-02T03:04:05+00:00");
        let Value::Timestamp(t) = text_to_value(oid::TIMESTAMPTZ, "timestamptz", b"1850-01-01 00:53:28+00:53:28")
        else {
            panic!("not a timestamp")
        };
        assert_eq!(t.to_rfc3339(), "1850-01-01T00:00:00+00:00");
        assert_eq!(
            text_to_value(oid::TIMESTAMPTZ, "timestamptz", b"infinity"),
            Value::Other { type_name: "timestamptz".into(), text: "infinity".into() }
        );
        assert_eq!(
            text_to_value(oid::DATE, "date", b"0045-02-29 BC"),
            Value::Date(NaiveDate::from_ymd_opt(-44, 2, 29).unwrap()),
            "45 BC is the astronomical year -44, a leap year"
        );
        assert_eq!(
            text_to_value(oid::DATE, "date", b"12345-06-07"),
            Value::Date(NaiveDate::from_ymd_opt(12345, 6, 7).unwrap())
        );
        let Value::Timestamp(t) = text_to_value(oid::TIMESTAMP, "timestamp", b"0001-01-01 10:00:00 BC") else {
            panic!("not a timestamp")
        };
        assert_eq!(chrono::Datelike::year(&t), 0);
        let Value::Timestamp(t) = text_to_value(oid::TIMESTAMPTZ, "timestamptz", b"0044-03-15 12:00:00+00 BC") else {
            panic!("not a timestamp")
        };
        assert_eq!(chrono::Datelike::year(&t), -43);
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
    fn arrays_of_any_dimension() {
        assert_eq!(builtin(1007, "_int4", "{1,NULL,3}"), Value::List(vec![Value::Int(1), Value::Null, Value::Int(3)]));
        assert_eq!(
            builtin(1009, "_text", r#"{"a,b","q\"x",NULL,"NULL"}"#),
            Value::List(vec![
                Value::Text("a,b".into()),
                Value::Text("q\"x".into()),
                Value::Null,
                Value::Text("NULL".into())
            ])
        );
        let t = |s: &str| Value::Text(s.into());
        assert_eq!(
            builtin(1009, "_text", "{{a,b},{c,NULL}}"),
            Value::List(vec![Value::List(vec![t("a"), t("b")]), Value::List(vec![t("c"), Value::Null])])
        );
        assert_eq!(
            builtin(1007, "_int4", "[0:1]={7,8}"),
            Value::List(vec![Value::Int(7), Value::Int(8)]),
            "explicit bounds"
        );
        assert_eq!(builtin(1007, "_int4", "{}"), Value::List(vec![]));
        assert_eq!(
            builtin(1020, "_box", "{(1,1),(0,0);(2,2),(1,1)}"),
            Value::List(vec![
                Value::Other { type_name: "oid 603".into(), text: "(1,1),(0,0)".into() },
                Value::Other { type_name: "oid 603".into(), text: "(2,2),(1,1)".into() }
            ]),
            "box arrays use ';'"
        );
        assert!(matches!(builtin(1007, "_int4", "{1,2"), Value::Other { .. }), "not an array literal");
    }

    #[test]
    fn catalog_types_arrays_of_domains_and_domains_over_arrays() {
        let mut types = Types::default();
        types.insert(23, "int4".into(), 0, 0);
        types.insert(9001, "s.pos".into(), 23, 0);
        types.insert(9002, "s._pos".into(), 0, 9001);
        types.insert(9003, "s.pos_list".into(), 9002, 0);
        types.insert(869, "inet".into(), 0, 0);
        types.insert(1041, "_inet".into(), 0, 869);
        assert_eq!(types.column(9001, "s.pos".into()).decode(b"5"), Value::Int(5));
        assert_eq!(
            types.column(9002, "s._pos".into()).decode(b"{5,6}"),
            Value::List(vec![Value::Int(5), Value::Int(6)])
        );
        assert_eq!(
            types.column(9003, "s.pos_list".into()).decode(b"{{1},{2}}"),
            Value::List(vec![Value::List(vec![Value::Int(1)]), Value::List(vec![Value::Int(2)])])
        );
        assert_eq!(
            types.column(1041, "_inet".into()).decode(b"{10.0.0.1,::1}"),
            Value::List(vec![
                Value::Other { type_name: "inet".into(), text: "10.0.0.1".into() },
                Value::Other { type_name: "inet".into(), text: "::1".into() }
            ])
        );
    }
}
