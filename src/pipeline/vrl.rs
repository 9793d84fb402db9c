//! Filters and transforms in VRL (the `vrl` crate, Vector's Remap Language): typed,
//! fail-safe, compiled once when a pipeline loads.
//!
//! The program sees the change as an object:
//!
//! ```text
//! { "op": "update", "relation": "public.orders", "schema": "public", "table": "orders",
//!   "source": "shop", "key": {…}, "before": {…}|null, "after": {…}|null,
//!   "unchanged": ["big_column"], "commit_time": t'…'|null, "version": "123456", "origin": null,
//!   "key_changed": false }
//! ```
//!
//! Values keep their exactness: a `numeric` is a string with its digits (convert explicitly with
//! `to_float!` if a float is what you want; nothing becomes a float behind your back), JSON
//! columns are objects, bytes are bytes.
//!
//! A **filter** is an expression that must return a boolean; `false` skips the change for this
//! pipeline. A **transform** reshapes `.`: it may change `.key`, `.before`, `.after` (dropping or
//! computing fields), set `.op` (e.g. a soft delete becomes a delete), add fields (reachable as
//! `{{ event.… }}` in templates), or set `.` to an array to emit several outputs. Fields left
//! untouched keep their original type (a decimal stays a decimal). A runtime error sends the
//! change to the dead-letter queue; `abort` skips it deliberately (counted, not dead-lettered).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use vrl::compiler::runtime::{Runtime, Terminate};
use vrl::compiler::state::RuntimeState;
use vrl::compiler::{Function, Program, TargetValue, TimeZone};
use vrl::value::{KeyString, ObjectMap, Secrets, Value as V};

use crate::change::{Change, Name, Op, Row, Value};

fn functions() -> &'static [Box<dyn Function>] {
    static F: OnceLock<Vec<Box<dyn Function>>> = OnceLock::new();
    F.get_or_init(vrl::stdlib::all)
}

/// A compile error: byte offset in the program and VRL's message.
#[derive(Debug, Clone)]
pub struct VrlError {
    /// Offset of the primary label in the program text.
    pub offset: usize,
    /// VRL's diagnostic (code, message, label).
    pub message: String,
}

/// What a program is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Boolean expression.
    Filter,
    /// Reshapes the event.
    Transform,
}

/// A compiled program (with its text, so a runtime error's byte span reads as line:col).
pub struct VrlProgram {
    program: Program,
    role: Role,
    source: String,
}

/// VRL's notes that help a person fix the program (hints, examples, the coercion advice),
/// without the documentation links.
fn helpful_notes(notes: &[vrl::diagnostic::Note]) -> Vec<String> {
    use vrl::diagnostic::Note;
    notes
        .iter()
        .filter(|n| !matches!(n, Note::SeeErrorDocs | Note::SeeDocs(..) | Note::SeeFunctionDocs(_)))
        .map(|n| n.to_string().trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// `… at (22:47) …` (byte offsets) → `… at line 2, column 5 …` of `source`.
fn spans_to_lines(text: &str, source: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(" at (") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 5..];
        let parsed = after.split_once(')').and_then(|(inner, tail)| {
            let (a, _) = inner.split_once(':')?;
            Some((a.trim().parse::<usize>().ok()?, tail))
        });
        match parsed {
            Some((start, tail)) => {
                let (line, col) = crate::config::line_col(source, start);
                out.push_str(&format!(" at line {line}, column {col} of the program"));
                rest = tail;
            }
            None => {
                out.push_str(" at (");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Outcome of running a program on a change.
pub enum Outcome<T> {
    /// Normal result.
    Ok(T),
    /// The program called `abort`: skip the change.
    Aborted,
    /// A runtime error: dead-letter the change with this reason.
    Failed(String),
}

impl VrlProgram {
    /// Compile source text; every error with its position.
    pub fn compile(source: &str, role: Role) -> Result<VrlProgram, Vec<VrlError>> {
        match vrl::compiler::compile(source, functions()) {
            Ok(result) => {
                let returns = result.program.final_type_info().result;
                if role == Role::Filter && !returns.kind().contains_boolean() {
                    // Found offline: a filter that can never be true or false.
                    return Err(vec![VrlError {
                        offset: 0,
                        message: format!(
                            "a filter must return a boolean (true keeps the change), but this program returns {}; compare or test a field, e.g. `.after.active == true`",
                            returns.kind()
                        ),
                    }]);
                }
                Ok(VrlProgram { program: result.program, role, source: source.to_string() })
            }
            Err(diagnostics) => Err(diagnostics
                .errors()
                .into_iter()
                .map(|d| {
                    let primary = d.labels.iter().find(|l| l.primary).or(d.labels.first());
                    let offset = primary.map(|l| l.span.start()).unwrap_or(0);
                    let label = primary.map(|l| format!(": {}", l.message)).unwrap_or_default();
                    let mut message = format!("error[E{:03}]: {}{label}", d.code, d.message);
                    for other in d
                        .labels
                        .iter()
                        .filter(|l| !primary.is_some_and(|p| std::ptr::eq(p, *l)) && !l.message.is_empty())
                    {
                        let (line, col) = crate::config::line_col(source, other.span.start());
                        message.push_str(&format!("; {} (program line {line}:{col})", other.message));
                    }
                    for note in helpful_notes(&d.notes) {
                        message.push_str(&format!("; {}", note.replace('\n', " ")));
                    }
                    VrlError { offset, message }
                })
                .collect()),
        }
    }

    fn run(&self, event: V) -> Outcome<(V, V)> {
        let mut target = TargetValue { value: event, metadata: V::Object(ObjectMap::new()), secrets: Secrets::new() };
        let mut runtime = Runtime::new(RuntimeState::default());
        match runtime.resolve(&mut target, &self.program, utc()) {
            Ok(result) => Outcome::Ok((result, target.value)),
            Err(Terminate::Abort(_)) => Outcome::Aborted,
            Err(e) => Outcome::Failed(spans_to_lines(&e.to_string(), &self.source)),
        }
    }

    /// Run a filter: true keeps the change.
    pub fn test(&self, change: &Change) -> Outcome<bool> {
        debug_assert_eq!(self.role, Role::Filter);
        match self.run(change_to_vrl(change)) {
            Outcome::Ok((V::Boolean(b), _)) => Outcome::Ok(b),
            Outcome::Ok((other, _)) => Outcome::Failed(format!("filter returned {}, not a boolean", other.kind_str())),
            Outcome::Aborted => Outcome::Aborted,
            Outcome::Failed(e) => Outcome::Failed(e),
        }
    }

    /// Run a transform: one output per resulting event (several when `.` became an array).
    pub fn transform(&self, change: &Change) -> Outcome<Vec<(Change, Value)>> {
        debug_assert_eq!(self.role, Role::Transform);
        let (_, out) = match self.run(change_to_vrl(change)) {
            Outcome::Ok(r) => r,
            Outcome::Aborted => return Outcome::Aborted,
            Outcome::Failed(e) => return Outcome::Failed(e),
        };
        let events = match out {
            V::Array(items) => items,
            other => vec![other],
        };
        let mut result = Vec::with_capacity(events.len());
        for ev in events {
            match derive(change, &ev) {
                Ok(c) => result.push((c, vrl_to_value(&ev))),
                Err(e) => return Outcome::Failed(e),
            }
        }
        Outcome::Ok(result)
    }
}

/// Programs run in UTC, whatever the host's zone.
fn utc() -> &'static TimeZone {
    static TZ: OnceLock<TimeZone> = OnceLock::new();
    TZ.get_or_init(|| TimeZone::parse("UTC").unwrap_or_default())
}

/// Our value → VRL, keeping exactness (decimals as their digits).
pub fn value_to_vrl(v: &Value) -> V {
    match v {
        Value::Null => V::Null,
        Value::Bool(b) => V::Boolean(*b),
        Value::Int(i) => V::Integer(*i),
        Value::Float(f) => match vrl::compiler::prelude::NotNan::new(*f) {
            Ok(n) => V::Float(n),
            Err(_) => V::from("NaN"),
        },
        Value::Decimal(s) | Value::Text(s) | Value::Uuid(s) => V::from(s.as_str()),
        Value::Other { text, .. } => V::from(text.as_str()),
        Value::Bytes(b) => V::Bytes(b.clone().into()),
        Value::Json(s) => {
            serde_json::from_str::<serde_json::Value>(s).map(V::from).unwrap_or_else(|_| V::from(s.as_str()))
        }
        Value::Timestamp(t) => V::Timestamp(*t),
        Value::Date(d) => V::from(d.to_string()),
        Value::List(l) | Value::Set(l) => V::Array(l.iter().map(value_to_vrl).collect()),
        Value::Map(m) => V::Object(m.iter().map(|(k, v)| (KeyString::from(k.as_str()), value_to_vrl(v))).collect()),
    }
}

/// VRL → our value.
pub fn vrl_to_value(v: &V) -> Value {
    match v {
        V::Null => Value::Null,
        V::Boolean(b) => Value::Bool(*b),
        V::Integer(i) => Value::Int(*i),
        V::Float(f) => Value::Float(f.into_inner()),
        V::Bytes(b) => match std::str::from_utf8(b) {
            Ok(s) => Value::Text(s.to_string()),
            Err(_) => Value::Bytes(b.to_vec()),
        },
        V::String(s) => Value::Text(s.to_string()),
        V::Regex(r) => Value::Text(r.as_str().to_string()),
        V::Timestamp(t) => Value::Timestamp(*t),
        V::Array(a) => Value::List(a.iter().map(vrl_to_value).collect()),
        V::Object(o) => Value::Map(o.iter().map(|(k, v)| (k.to_string(), vrl_to_value(v))).collect()),
    }
}

fn row_to_vrl(r: &Row) -> V {
    V::Object(r.iter().map(|(n, v)| (KeyString::from(&**n), value_to_vrl(v))).collect())
}

/// The change as the object programs see.
pub fn change_to_vrl(c: &Change) -> V {
    let (schema, table) = c.relation.rsplit_once('.').unwrap_or(("", &c.relation));
    let mut m: ObjectMap = BTreeMap::new();
    m.insert("op".into(), V::from(c.op.as_str()));
    m.insert("relation".into(), V::from(&*c.relation));
    m.insert("schema".into(), V::from(schema));
    m.insert("table".into(), V::from(table));
    m.insert("source".into(), V::from(&*c.source));
    m.insert("key".into(), row_to_vrl(&c.key));
    m.insert("before".into(), c.before.as_ref().map(row_to_vrl).unwrap_or(V::Null));
    m.insert("after".into(), c.after.as_ref().map(row_to_vrl).unwrap_or(V::Null));
    m.insert("unchanged".into(), V::Array(c.unchanged.iter().map(|n| V::from(&**n)).collect()));
    m.insert("commit_time".into(), c.commit_time.map(V::Timestamp).unwrap_or(V::Null));
    m.insert("version".into(), V::from(c.version.to_string()));
    m.insert("origin".into(), c.origin.as_ref().map(|o| V::from(&**o)).unwrap_or(V::Null));
    m.insert("key_changed".into(), V::Boolean(c.key_changed));
    V::Object(m)
}

/// Rebuild a row from the program's output, keeping the original typed value wherever the
/// program left a field as it was.
fn row_from_vrl(original: Option<&Row>, v: &V, what: &str) -> Result<Option<Row>, String> {
    match v {
        V::Null => Ok(None),
        V::Object(o) => {
            let mut row = Row::with_capacity(o.len());
            // Original column order first, then new fields.
            if let Some(orig) = original {
                for (n, ov) in orig.iter() {
                    if let Some(nv) = o.get(&**n) {
                        let kept = if value_to_vrl(ov) == *nv { ov.clone() } else { vrl_to_value(nv) };
                        row.push(Arc::clone(n), kept);
                    }
                }
            }
            for (k, nv) in o {
                if original.is_none_or(|orig| orig.get(k.as_str()).is_none()) {
                    row.push(Name::from(k.as_str()), vrl_to_value(nv));
                }
            }
            Ok(Some(row))
        }
        other => Err(format!("transform set .{what} to {}; it must be an object or null", other.kind_str())),
    }
}

/// The change a transform's output describes.
fn derive(original: &Change, ev: &V) -> Result<Change, String> {
    let V::Object(o) = ev else {
        return Err(format!("transform must leave . an object (or an array of objects), not {}", ev.kind_str()));
    };
    let mut c = original.clone();
    if let Some(op) = o.get("op") {
        let s = match op {
            V::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
            V::String(s) => s.to_string(),
            other => return Err(format!("transform set .op to {}", other.kind_str())),
        };
        c.op = Op::parse(&s).ok_or_else(|| format!("transform set .op to {s:?}"))?;
    }
    match o.get("key") {
        Some(k) => c.key = row_from_vrl(Some(&original.key), k, "key")?.unwrap_or_default(),
        None => c.key = Row::default(),
    }
    c.before = match o.get("before") {
        Some(b) => row_from_vrl(original.before.as_ref(), b, "before")?,
        None => None,
    };
    c.after = match o.get("after") {
        Some(a) => row_from_vrl(original.after.as_ref(), a, "after")?,
        None => None,
    };
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change() -> Change {
        let mut after = Row::default();
        after.push("id".into(), Value::Int(7));
        after.push("total".into(), Value::Decimal("12.30".into()));
        after.push("secret".into(), Value::Text("pw".into()));
        after.push("doc".into(), Value::Json(r#"{"a":[1,2]}"#.into()));
        let mut key = Row::default();
        key.push("id".into(), Value::Int(7));
        Change::test_insert("public.orders", key, Some(after))
    }

    #[test]
    fn a_filter_that_cannot_return_a_boolean_is_refused_at_compile_time() {
        let errs = VrlProgram::compile("upcase(\"keep\")", Role::Filter).err().expect("refused");
        assert!(errs[0].message.contains("returns string"), "{}", errs[0].message);
        assert!(VrlProgram::compile(".after.active", Role::Filter).is_ok(), "an unknown type may be a boolean");
        assert!(VrlProgram::compile("upcase(\"keep\")", Role::Transform).is_ok(), "a transform returns anything");
    }

    #[test]
    fn filter_sees_exact_values() {
        let f = VrlProgram::compile(r#".after.total == "12.30" && .op == "insert""#, Role::Filter).unwrap();
        assert!(matches!(f.test(&change()), Outcome::Ok(true)));
        let f = VrlProgram::compile(r#".after.doc.a[1] == 2"#, Role::Filter).unwrap();
        assert!(matches!(f.test(&change()), Outcome::Ok(true)));
        let f = VrlProgram::compile(r#".after.id"#, Role::Filter).unwrap();
        assert!(matches!(f.test(&change()), Outcome::Failed(e) if e.contains("not a boolean")));
    }

    #[test]
    fn transform_drops_keeps_types_and_splits() {
        let t = VrlProgram::compile(
            "del(.after.secret)\n.after.cents = to_int!(to_float!(.after.total) * 100)",
            Role::Transform,
        )
        .unwrap();
        let Outcome::Ok(out) = t.transform(&change()) else { panic!("ran") };
        let after = out[0].0.after.as_ref().unwrap();
        assert!(after.get("secret").is_none());
        assert_eq!(after.get("total"), Some(&Value::Decimal("12.30".into())), "untouched decimal stays exact");
        assert_eq!(after.get("doc"), Some(&Value::Json(r#"{"a":[1,2]}"#.into())));
        assert_eq!(after.get("cents"), Some(&Value::Int(1230)));
        assert_eq!(out[0].0.key.get("id"), Some(&Value::Int(7)));

        let split =
            VrlProgram::compile(". = [merge(., {\"part\": 1}), merge(., {\"part\": 2})]", Role::Transform).unwrap();
        let Outcome::Ok(out) = split.transform(&change()) else { panic!("ran") };
        assert_eq!(out.len(), 2);
        let Value::Map(m) = &out[1].1 else { panic!("event is a map") };
        assert!(m.iter().any(|(k, v)| k == "part" && *v == Value::Int(2)));
    }

    #[test]
    fn errors_and_abort() {
        let t = VrlProgram::compile(r#".after.n = to_int!(.after.secret)"#, Role::Transform).unwrap();
        assert!(matches!(t.transform(&change()), Outcome::Failed(_)));
        let t = VrlProgram::compile("abort", Role::Transform).unwrap();
        assert!(matches!(t.transform(&change()), Outcome::Aborted));
        let e = VrlProgram::compile(".after.x = to_int(.after.y)\n.foo = bar(", Role::Transform).err().unwrap();
        assert!(!e.is_empty() && e[0].message.starts_with("error[E"), "{:?}", e);
        // The fallible call's advice is kept whole.
        let e = VrlProgram::compile(".after.x = to_int(.after.y)", Role::Transform).err().unwrap();
        assert!(e[0].message.contains("infallible assignment"), "{:?}", e);
        // A runtime error names line and column of the program, not a byte span.
        let t = VrlProgram::compile(".a = 1\n.after.n = to_int!(.after.secret)", Role::Transform).unwrap();
        let Outcome::Failed(msg) = t.transform(&change()) else { panic!("expected a failure") };
        assert!(msg.contains("line 2, column") && !msg.contains("at ("), "{msg}");
    }
}
