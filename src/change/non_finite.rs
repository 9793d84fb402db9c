//! Values JSON has no literal for: NaN and ±Infinity (floats, `numeric`) and infinite dates
//! (`date`, `timestamp`, `timestamptz` `±infinity`). Each pipeline chooses, with
//! `non_finite`, what its sinks receive for them, so one such column never dead-letters the
//! whole row unless the operator asks for that.
//!
//! The choice is applied to the before and after images once, before the filter, so every
//! sink of the pipeline (and its VRL) sees the same form. Keys are left alone: their text in
//! templates (`NaN`, `infinity`) is already what `"string"` gives.

use super::{Change, Row, Value};

/// What a pipeline's sinks receive for a value JSON cannot carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonFinite {
    /// PostgreSQL's own spelling as a string: `"NaN"`, `"Infinity"`, `"-Infinity"`,
    /// `"infinity"`, `"-infinity"`. Lossless, and a search index keeps the field's mapping
    /// for the other rows only if it is a keyword or text field (see docs/types.md).
    #[default]
    String,
    /// JSON `null` (a hash field or a point field is left out, a graph property removed).
    Null,
    /// Leave the value as it is: every sink that cannot write it dead-letters the change.
    Reject,
}

impl NonFinite {
    /// The config word, for `check` output.
    pub fn word(self) -> &'static str {
        match self {
            NonFinite::String => "string",
            NonFinite::Null => "null",
            NonFinite::Reject => "reject",
        }
    }

    /// Parse the config word.
    pub fn parse(word: &str) -> Option<NonFinite> {
        Some(match word {
            "string" => NonFinite::String,
            "null" => NonFinite::Null,
            "reject" => NonFinite::Reject,
            _ => return None,
        })
    }
}

/// PostgreSQL's spelling of a non-finite value, or `None` for a value JSON can carry.
pub fn spelling(v: &Value) -> Option<&str> {
    match v {
        Value::Float(f) if f.is_nan() => Some("NaN"),
        Value::Float(f) if *f == f64::INFINITY => Some("Infinity"),
        Value::Float(f) if *f == f64::NEG_INFINITY => Some("-Infinity"),
        Value::Decimal(d) if matches!(d.as_str(), "NaN" | "Infinity" | "-Infinity") => Some(d),
        Value::Other { type_name, text }
            if matches!(type_name.as_str(), "date" | "timestamp" | "timestamptz")
                && matches!(text.as_str(), "infinity" | "-infinity") =>
        {
            Some(text)
        }
        _ => None,
    }
}

/// True if `s` is how [`NonFinite::String`] writes a non-finite value.
pub fn is_spelling(s: &str) -> bool {
    matches!(s, "NaN" | "Infinity" | "-Infinity" | "infinity" | "-infinity")
}

fn contains(v: &Value) -> bool {
    match v {
        Value::List(items) | Value::Set(items) => items.iter().any(contains),
        Value::Map(fields) => fields.iter().any(|(_, v)| contains(v)),
        v => spelling(v).is_some(),
    }
}

fn rewrite(v: &mut Value, policy: NonFinite) {
    match v {
        Value::List(items) | Value::Set(items) => items.iter_mut().for_each(|i| rewrite(i, policy)),
        Value::Map(fields) => fields.iter_mut().for_each(|(_, v)| rewrite(v, policy)),
        other => {
            if let Some(s) = spelling(other) {
                *other = match policy {
                    NonFinite::String => Value::Text(s.to_string()),
                    NonFinite::Null => Value::Null,
                    NonFinite::Reject => return,
                };
            }
        }
    }
}

/// The change with its non-finite values in the pipeline's form; `None` when it has none (the
/// common case: nothing is copied).
pub fn apply(change: &Change, policy: NonFinite) -> Option<Change> {
    if policy == NonFinite::Reject {
        return None;
    }
    let has = |row: &Option<Row>| row.as_ref().is_some_and(|r| r.iter().any(|(_, v)| contains(v)));
    if !has(&change.before) && !has(&change.after) {
        return None;
    }
    let mut out = change.clone();
    for row in [out.before.as_mut(), out.after.as_mut()].into_iter().flatten() {
        row.values_mut().for_each(|v| rewrite(v, policy));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change() -> Change {
        let mut key = Row::default();
        key.push("id".into(), Value::Decimal("NaN".into()));
        let mut after = Row::default();
        after.push("id".into(), Value::Decimal("NaN".into()));
        after.push("f".into(), Value::Float(f64::NEG_INFINITY));
        after.push("ok".into(), Value::Float(1.5));
        after.push("d".into(), Value::Other { type_name: "date".into(), text: "infinity".into() });
        after.push("a".into(), Value::List(vec![Value::Float(f64::NAN), Value::Int(1)]));
        after.push("i".into(), Value::Other { type_name: "interval".into(), text: "infinity".into() });
        Change::test_insert("public.t", key, Some(after))
    }

    #[test]
    fn string_spells_each_value_as_postgresql_does() {
        let c = apply(&change(), NonFinite::String).unwrap();
        let a = c.after.unwrap();
        assert_eq!(a.get("id"), Some(&Value::Text("NaN".into())));
        assert_eq!(a.get("f"), Some(&Value::Text("-Infinity".into())));
        assert_eq!(a.get("ok"), Some(&Value::Float(1.5)));
        assert_eq!(a.get("d"), Some(&Value::Text("infinity".into())));
        assert_eq!(a.get("a"), Some(&Value::List(vec![Value::Text("NaN".into()), Value::Int(1)])));
        assert!(matches!(a.get("i"), Some(Value::Other { .. })), "an interval's text is not a non-finite value");
        assert_eq!(c.key.get("id"), Some(&Value::Decimal("NaN".into())), "keys keep their value");
    }

    #[test]
    fn null_and_reject() {
        let a = apply(&change(), NonFinite::Null).unwrap().after.unwrap();
        assert_eq!(a.get("f"), Some(&Value::Null));
        assert_eq!(a.get("a"), Some(&Value::List(vec![Value::Null, Value::Int(1)])));
        assert!(apply(&change(), NonFinite::Reject).is_none());
        let mut plain = Row::default();
        plain.push("x".into(), Value::Float(2.0));
        assert!(apply(&Change::test_insert("public.t", Row::default(), Some(plain)), NonFinite::String).is_none());
    }
}
