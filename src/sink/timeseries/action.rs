//! Points from changes: zero, one or many per change.
//!
//! ```toml
//! [[sink]]
//! target = "metrics"
//! [[sink.point]]                          # an order insert → its value, by region
//! measurement = "order_value"             # template
//! table = "orders"                        # Timestream table (template; default: the sink's)
//! ops = ["insert"]                        # default: insert, update, read
//! time = "after.created_at"               # a timestamp path; default: the commit time
//! tags = { region = "{{ after.region }}" }   # dimensions / tags: templates
//! [sink.point.fields]
//! total = { path = "after.total", type = "double" }
//! [[sink.point]]                          # … and a count, by region
//! measurement = "orders_total"
//! ops = ["insert"]
//! tags = { region = "{{ after.region }}" }
//! fields = { count = { value = "1", type = "bigint" } }
//! ```
//!
//! Field types are `double`, `bigint`, `varchar`, `boolean` and `timestamp`; without `type` the
//! value's own type decides (decimals are doubles written with their exact digits). A NULL field
//! is left out; a point whose fields are all NULL is not written. Versions come from the change
//! (see [`crate::sink::version`]), so a replay upserts instead of conflicting.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::change::non_finite::is_spelling;
use crate::change::template::{Path, Scope, Template};
use crate::change::{Change, Op, Value};
use crate::sink::version::external_version;
use crate::sink::{Action, Payload};

/// A typed measure value.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Measure {
    /// DOUBLE, as decimal text (exact digits).
    Double(String),
    /// BIGINT.
    Bigint(i64),
    /// VARCHAR.
    Varchar(String),
    /// BOOLEAN.
    Boolean(bool),
    /// TIMESTAMP, milliseconds since the epoch.
    Timestamp(i64),
}

/// One point.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// Timestream table (None: the sink's default).
    pub table: Option<String>,
    /// Measurement / measure name.
    pub measurement: String,
    /// Dimensions / tags.
    pub tags: Vec<(String, String)>,
    /// Measures / fields.
    pub fields: Vec<(String, Measure)>,
    /// Microseconds since the epoch.
    pub time_micros: i64,
    /// Nanoseconds added to `time_micros` (0–999): the change's index in its transaction, so
    /// the points of rows written together (`created_at = now()`, or the commit time) get
    /// distinct timestamps instead of overwriting each other, and a replay of a change lands
    /// on the same point again. Spool entries written before it existed read as 0.
    #[serde(default)]
    pub nanos: u16,
    /// Record version.
    pub version: i64,
}

impl Point {
    /// The point's time in nanoseconds since the epoch.
    pub fn time_nanos(&self) -> i64 {
        self.time_micros.saturating_mul(1000).saturating_add(i64::from(self.nanos))
    }
}

/// Points of one write that would land on the same series and time, so the store keeps only
/// the last: counted in `polysync_timeseries_point_collisions_total` and said once per write
/// with the first such point, never dropped silently. `records` are each record's points.
pub fn report_collisions<'a>(sink: &str, records: impl Iterator<Item = &'a [Point]>) {
    let mut seen = std::collections::HashSet::new();
    let mut first = None;
    let mut n = 0u64;
    for points in records {
        for p in points {
            let mut tags = p.tags.clone();
            tags.sort();
            if !seen.insert((p.table.clone(), p.measurement.clone(), tags, p.time_nanos())) {
                n += 1;
                first.get_or_insert_with(|| format!("{} {:?} at {} ns", p.measurement, p.tags, p.time_nanos()));
            }
        }
    }
    if let Some(first) = first {
        crate::telemetry::metrics().ts_point_collisions.with_label_values(&[sink]).inc_by(n);
        tracing::warn!(sink, points = n, first = %first, "time-series points share measurement, tags and time, so the store keeps only one of each; add a tag that tells their rows apart (docs/types.md, \"Time series\")");
    }
}

/// The sub-microsecond part of a change's points: its index within the transaction (a
/// snapshot row's index within its chunk, a DynamoDB record's sequence number), modulo 1000.
/// Unique for up to 1000 changes of one transaction that share measurement, tags and time;
/// beyond that, or for rows of different transactions in the same microsecond, a tag that
/// tells them apart is needed (docs/types.md, "Time series").
pub fn sequence_nanos(change: &Change) -> u16 {
    use crate::change::Position;
    let n = match &change.position {
        Position::Pg { seq, .. } => u64::from(*seq),
        Position::Snapshot { chunk, .. } => *chunk,
        Position::Ddb { sequence, .. } => sequence.last_digits(3),
    };
    (n % 1000) as u16
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum FieldType {
    Double,
    Bigint,
    Varchar,
    Boolean,
    Timestamp,
}

/// A field as written: a path, or a table with `path` or `value` and an optional `type`. The
/// type is read as text and checked here, so a wrong one is named with the choices (serde's
/// untagged enums only say that no variant matched).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawField {
    Path(String),
    Spec {
        #[serde(default)]
        path: Option<String>,
        #[serde(default)]
        value: Option<toml::Value>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
    },
}

const FIELD_TYPES: &str = "double, bigint, varchar, boolean, timestamp";

fn field_type(name: &str, kind: Option<String>) -> Result<Option<FieldType>, String> {
    let Some(k) = kind else { return Ok(None) };
    let t = match k.as_str() {
        "double" => FieldType::Double,
        "bigint" => FieldType::Bigint,
        "varchar" => FieldType::Varchar,
        "boolean" => FieldType::Boolean,
        "timestamp" => FieldType::Timestamp,
        other => {
            let hint = match other {
                "float" | "float64" | "real" | "number" | "numeric" | "decimal" => " (a float is `double`)",
                "int" | "integer" | "long" | "int64" => " (an integer is `bigint`)",
                "string" | "text" => " (text is `varchar`)",
                "bool" => " (`boolean`)",
                _ => "",
            };
            return Err(format!("field {name}: type {other:?} is not one of {FIELD_TYPES}{hint}"));
        }
    };
    Ok(Some(t))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPoint {
    measurement: String,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    ops: Option<Vec<String>>,
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    fields: BTreeMap<String, RawField>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    #[allow(dead_code)]
    target: String,
    point: Vec<RawPoint>,
}

enum Source {
    Path(Path),
    Const(String),
}

struct FieldMap {
    name: String,
    source: Source,
    kind: Option<FieldType>,
}

struct PointMap {
    measurement: Template,
    table: Option<Template>,
    ops: crate::change::matcher::OpSet,
    time: Option<Path>,
    tags: Vec<(String, Template)>,
    fields: Vec<FieldMap>,
}

/// Compiled point mappings.
pub struct Points {
    points: Vec<PointMap>,
}

fn tpl(s: &str) -> Result<Template, String> {
    Template::parse(s).map_err(|e| format!("template {s:?}: {}", e.msg))
}

/// Compile a `[[sink]]` table aimed at a time-series target.
pub fn compile(table: toml::Table) -> Result<Arc<dyn Action>, String> {
    let raw: RawAction = crate::sink::parse_action(table)?;
    if raw.point.is_empty() {
        return Err("a timeseries sink needs at least one [[sink.point]]".into());
    }
    let mut points = Vec::new();
    for p in raw.point {
        let ops = match p.ops {
            None => crate::change::matcher::OpSet::from_ops([Op::Insert, Op::Update, Op::Read]),
            Some(list) => crate::change::matcher::OpSet::from_ops(
                list.iter()
                    .map(|o| Op::parse(o).ok_or_else(|| format!("unknown op {o:?}")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        if p.fields.is_empty() {
            return Err(format!("point {}: needs at least one field", p.measurement));
        }
        let mut fields = Vec::new();
        for (name, f) in p.fields {
            let (source, kind) = match f {
                RawField::Path(path) => {
                    (Source::Path(Path::parse(&path).map_err(|e| format!("field {name}: {e}"))?), None)
                }
                RawField::Spec { path: Some(path), value: None, kind } => (
                    Source::Path(Path::parse(&path).map_err(|e| format!("field {name}: {e}"))?),
                    field_type(&name, kind)?,
                ),
                RawField::Spec { path: None, value: Some(v), kind } => {
                    let text = match v {
                        toml::Value::String(s) => s,
                        toml::Value::Integer(i) => i.to_string(),
                        toml::Value::Float(f) => f.to_string(),
                        toml::Value::Boolean(b) => b.to_string(),
                        other => {
                            return Err(format!(
                                "field {name}: value must be a string, number or boolean, not {}",
                                other.type_str()
                            ));
                        }
                    };
                    (Source::Const(text), field_type(&name, kind)?)
                }
                RawField::Spec { .. } => return Err(format!("field {name}: set exactly one of path and value")),
            };
            fields.push(FieldMap { name, source, kind });
        }
        points.push(PointMap {
            measurement: tpl(&p.measurement)?,
            table: p.table.as_deref().map(tpl).transpose()?,
            ops,
            time: p.time.as_deref().map(|t| Path::parse(t).map_err(|e| format!("time: {e}"))).transpose()?,
            tags: p.tags.into_iter().map(|(k, v)| Ok((k, tpl(&v)?))).collect::<Result<_, String>>()?,
            fields,
        });
    }
    Ok(Arc::new(Points { points }))
}

fn convert(name: &str, v: &Value, kind: Option<FieldType>) -> Result<Option<Measure>, String> {
    use FieldType as T;
    let text = || v.template_text().map(|t| t.into_owned());
    let as_f64_text = |s: String| -> Result<Measure, String> {
        if s.parse::<f64>().is_ok_and(f64::is_finite) {
            Ok(Measure::Double(s))
        } else {
            Err(format!("field {name}: {s:?} is not a finite number"))
        }
    };
    Ok(Some(match (v, kind) {
        (Value::Null, _) => return Ok(None),
        // Line protocol has no NaN, infinity or infinite time: such a measure is left out of
        // the point, as a NULL is (under the pipeline's non_finite = "string" it arrives as its
        // spelling; under "reject" as the value itself, which is an error below).
        (Value::Text(s), Some(T::Double | T::Bigint | T::Timestamp)) if is_spelling(s) => return Ok(None),
        (Value::Int(i), None | Some(T::Bigint)) => Measure::Bigint(*i),
        (Value::Int(i), Some(T::Double)) => Measure::Double(i.to_string()),
        (Value::Float(f), None | Some(T::Double)) => as_f64_text(format!("{f:?}"))?,
        (Value::Decimal(d), None | Some(T::Double)) => as_f64_text(d.clone())?,
        (Value::Bool(b), None | Some(T::Boolean)) => Measure::Boolean(*b),
        (Value::Timestamp(t), None | Some(T::Timestamp)) => Measure::Timestamp(t.timestamp_millis()),
        (Value::Timestamp(t), Some(T::Bigint)) => Measure::Bigint(t.timestamp_millis()),
        (_, Some(T::Varchar)) | (Value::Text(_) | Value::Uuid(_) | Value::Other { .. } | Value::Date(_), None) => {
            Measure::Varchar(text().ok_or_else(|| format!("field {name}: {} has no text form", v.type_word()))?)
        }
        (_, Some(T::Double)) => as_f64_text(text().unwrap_or_default())?,
        (_, Some(T::Bigint)) => Measure::Bigint(
            text()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| format!("field {name}: {} is not an integer", v.type_word()))?,
        ),
        (_, Some(T::Boolean)) => match text().as_deref() {
            Some("true") | Some("t") => Measure::Boolean(true),
            Some("false") | Some("f") => Measure::Boolean(false),
            _ => return Err(format!("field {name}: {} is not a boolean", v.type_word())),
        },
        (other, k) => return Err(format!("field {name}: a {} cannot be a {k:?} measure", other.type_word())),
    }))
}

impl Action for Points {
    fn render(&self, scope: &dyn Scope, change: &Change, out: &mut Vec<Payload>) -> Result<(), String> {
        let mut points = Vec::new();
        for p in &self.points {
            if !p.ops.contains(change.op) {
                continue;
            }
            let mut fields = Vec::with_capacity(p.fields.len());
            for f in &p.fields {
                // A field read from a column the source did not send (TOAST-unchanged) is left
                // out of the point: its value at this time is not known.
                if matches!(&f.source, Source::Path(path) if scope.unchanged(path)) {
                    continue;
                }
                let value = match &f.source {
                    Source::Const(c) => Value::Text(c.clone()),
                    Source::Path(path) => scope
                        .resolve(path)
                        .map(|v| v.into_owned())
                        .ok_or_else(|| format!("field {}: template field {path} is missing", f.name))?,
                };
                let kind = match (&f.source, f.kind) {
                    (Source::Const(_), None) => Some(FieldType::Varchar),
                    (_, k) => k,
                };
                if let Some(m) = convert(&f.name, &value, kind)? {
                    fields.push((f.name.clone(), m));
                }
            }
            if fields.is_empty() {
                continue;
            }
            let time_micros = match &p.time {
                Some(path) => match scope.resolve(path).as_deref() {
                    Some(Value::Timestamp(t)) => t.timestamp_micros(),
                    Some(other) => return Err(format!("time {path} is {}, not a timestamp", other.type_word())),
                    None => return Err(format!("time {path} is missing")),
                },
                None => change
                    .commit_time
                    .ok_or("the change has no commit time; set time = \"<timestamp path>\"")?
                    .timestamp_micros(),
            };
            let tags = p
                .tags
                .iter()
                .map(|(k, t)| t.render(scope).map(|v| (k.clone(), v)).map_err(|e| format!("tag {k}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            points.push(Point {
                table: p.table.as_ref().map(|t| t.render(scope)).transpose().map_err(|e| e.to_string())?,
                measurement: p.measurement.render(scope).map_err(|e| e.to_string())?,
                tags,
                fields,
                time_micros,
                nanos: sequence_nanos(change),
                version: external_version(change)?,
            });
        }
        if !points.is_empty() {
            out.push(Payload::Points(points));
        }
        Ok(())
    }

    fn paths(&self) -> Vec<&Path> {
        let mut v = Vec::new();
        for p in &self.points {
            v.extend(p.measurement.paths());
            if let Some(t) = &p.table {
                v.extend(t.paths());
            }
            if let Some(t) = &p.time {
                v.push(t);
            }
            for (_, t) in &p.tags {
                v.extend(t.paths());
            }
            for f in &p.fields {
                if let Source::Path(path) = &f.source {
                    v.push(path);
                }
            }
        }
        v
    }

    fn describe(&self) -> String {
        self.points
            .iter()
            .map(|p| {
                format!(
                    "point {} [{}]",
                    p.measurement,
                    p.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Name, Position, Row};

    fn change_at(seq: u32) -> Change {
        let key: Row = [(Name::from("id"), Value::Int(i64::from(seq)))].into_iter().collect();
        let mut c = Change::test_insert("public.orders", key.clone(), Some(key));
        c.position = Position::Pg { commit_lsn: 42, seq };
        c
    }

    fn point(measurement: &str, nanos: u16) -> Point {
        Point {
            table: None,
            measurement: measurement.into(),
            tags: vec![("region".into(), "eu".into())],
            fields: vec![("count".into(), Measure::Bigint(1))],
            time_micros: 1_000,
            nanos,
            version: 1,
        }
    }

    #[test]
    fn changes_of_one_transaction_get_distinct_times_and_collisions_are_counted() {
        let nanos: Vec<u16> = (0..5).map(|s| sequence_nanos(&change_at(s))).collect();
        assert_eq!(nanos, vec![0, 1, 2, 3, 4]);
        assert_eq!(sequence_nanos(&change_at(1234)), 234);
        assert_eq!(point("m", 7).time_nanos(), 1_000_007);
        let counter = crate::telemetry::metrics().ts_point_collisions.with_label_values(&["ts-unit"]);
        let before = counter.get();
        let a = [point("m", 1), point("n", 1)];
        let b = [point("m", 2)];
        report_collisions("ts-unit", [&a[..], &b[..]].into_iter());
        assert_eq!(counter.get(), before, "distinct measurement or time: no collision");
        let c = [point("m", 1)];
        report_collisions("ts-unit", [&a[..], &c[..]].into_iter());
        assert_eq!(counter.get(), before + 1, "same series and time from another record");
    }
}
