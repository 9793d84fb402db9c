//! The one model every source produces and every pipeline consumes (DESIGN.md §2).
//!
//! Nothing downstream of a source knows whether a change came from PostgreSQL or DynamoDB
//! except through these fields, which is what lets one set of pipelines and sinks serve both.

pub mod json;
pub mod matcher;
pub mod non_finite;
pub mod scope;
pub mod template;

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};

/// Shared, cheap-to-clone name (relation, column, source). Column names are shared between
/// every row of a relation, so a row costs a pointer per column, not a string.
pub type Name = Arc<str>;

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
    /// Every row of the relation removed at once; carries no key.
    Truncate,
    /// A row read by a snapshot/backfill rather than the change stream.
    Read,
}

impl Op {
    /// Lower-case name used in config files, templates and the DLQ.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
            Op::Read => "read",
        }
    }

    /// Parse the config spelling; `None` for anything else so the caller can name the bad word.
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "insert" => Op::Insert,
            "update" => Op::Update,
            "delete" => Op::Delete,
            "truncate" => Op::Truncate,
            "read" => Op::Read,
            _ => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A column value, exact: numbers that are not machine integers stay decimal strings so no sink
/// ever sees a rounded price, and types polysync does not know arrive as text with their name.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL / DynamoDB NULL.
    Null,
    /// Boolean.
    Bool(bool),
    /// Integers that fit in 64 bits (int2/4/8).
    Int(i64),
    /// Binary floating point (float4/8); NaN and infinities are kept as such.
    Float(f64),
    /// Exact decimal in its canonical text form (`numeric`, DynamoDB `N`), including `NaN`.
    Decimal(String),
    /// Character data.
    Text(String),
    /// Binary data.
    Bytes(Vec<u8>),
    /// JSON kept as the exact text the source sent, so numbers inside it are never rounded.
    Json(String),
    /// An instant, microsecond precision.
    Timestamp(DateTime<Utc>),
    /// A calendar date.
    Date(NaiveDate),
    /// A UUID in canonical hyphenated lower-case text.
    Uuid(String),
    /// Ordered values (pg arrays, DynamoDB L).
    List(Vec<Value>),
    /// Named values (DynamoDB M).
    Map(Vec<(String, Value)>),
    /// Unordered unique values (DynamoDB SS/NS/BS).
    Set(Vec<Value>),
    /// A value of a type polysync does not decode, kept as the source's text with the type name.
    Other {
        /// Source type name, e.g. `inet`, `interval`, `my_enum`.
        type_name: String,
        /// The source's text representation.
        text: String,
    },
}

impl Value {
    /// Text used when a value is spliced into a key, id or index name template. `None` for
    /// values that have no sensible single-line form (null, containers).
    pub fn template_text(&self) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        Some(match self {
            Value::Null | Value::List(_) | Value::Map(_) | Value::Set(_) => return None,
            Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
            Value::Int(i) => Cow::Owned(i.to_string()),
            Value::Float(f) => Cow::Owned(f.to_string()),
            Value::Decimal(s) | Value::Text(s) | Value::Json(s) | Value::Uuid(s) => Cow::Borrowed(s.as_str()),
            Value::Bytes(b) => Cow::Owned(hex::encode(b)),
            Value::Timestamp(t) => Cow::Owned(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            Value::Date(d) => Cow::Owned(d.to_string()),
            Value::Other { text, .. } => Cow::Borrowed(text.as_str()),
        })
    }

    /// Short type word for error messages and the DLQ.
    pub fn type_word(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Decimal(_) => "decimal",
            Value::Text(_) => "text",
            Value::Bytes(_) => "bytes",
            Value::Json(_) => "json",
            Value::Timestamp(_) => "timestamp",
            Value::Date(_) => "date",
            Value::Uuid(_) => "uuid",
            Value::List(_) => "list",
            Value::Map(_) => "map",
            Value::Set(_) => "set",
            Value::Other { .. } => "other",
        }
    }
}

/// Column/attribute name → value pairs, in source order. Rows are small (tens of columns), so a
/// vector with linear lookup beats a hash map and keeps source order for JSON output.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    fields: Vec<(Name, Value)>,
}

impl Row {
    /// An empty row with room for `n` fields.
    pub fn with_capacity(n: usize) -> Row {
        Row { fields: Vec::with_capacity(n) }
    }

    /// Append a field (source order is kept).
    pub fn push(&mut self, name: Name, value: Value) {
        self.fields.push((name, value));
    }

    /// The value of a field, if the row has it.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(n, _)| &**n == name).map(|(_, v)| v)
    }

    /// The value of a field, to replace it in place (e.g. decoding a declared text column).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Value> {
        self.fields.iter_mut().find(|(n, _)| &**n == name).map(|(_, v)| v)
    }

    /// Every value, to rewrite in place (column names stay shared).
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Value> {
        self.fields.iter_mut().map(|(_, v)| v)
    }

    /// Fields in source order.
    pub fn iter(&self) -> impl Iterator<Item = (&Name, &Value)> {
        self.fields.iter().map(|(n, v)| (n, v))
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// True when the row has no fields.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Text identifying this row as a key, the same whichever path produced it (the stream or a
    /// snapshot read): field names and the values' text, never type names or value kinds, in
    /// the row's order (sources give keys in the table's column order).
    pub fn identity(&self) -> String {
        fn value(out: &mut String, v: &Value) {
            match v {
                Value::Null => out.push('\u{0}'),
                Value::List(items) | Value::Set(items) => {
                    out.push('[');
                    for i in items {
                        value(out, i);
                        out.push('\u{1d}');
                    }
                    out.push(']');
                }
                Value::Map(m) => {
                    out.push('{');
                    for (k, i) in m {
                        out.push_str(k);
                        out.push('\u{1d}');
                        value(out, i);
                        out.push('\u{1d}');
                    }
                    out.push('}');
                }
                other => out.push_str(&other.template_text().unwrap_or_default()),
            }
        }
        let mut s = String::new();
        for (n, v) in self.iter() {
            s.push_str(n);
            s.push('\u{1f}');
            value(&mut s, v);
            s.push('\u{1e}');
        }
        s
    }
}

impl FromIterator<(Name, Value)> for Row {
    fn from_iter<T: IntoIterator<Item = (Name, Value)>>(iter: T) -> Self {
        Row { fields: iter.into_iter().collect() }
    }
}

/// The number every sink compares (with `>=`) so that replays and races cannot roll data back.
///
/// Exact up to 40 decimal digits, because DynamoDB stream sequence numbers have up to 40 digits
/// and PostgreSQL LSNs are 64-bit. Stored as `hi * 10^38 + lo`; the derived ordering is numeric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    hi: u8,
    lo: u128,
}

impl Version {
    /// Version from a 64-bit number (a PostgreSQL LSN).
    pub fn from_u64(v: u64) -> Version {
        Version { hi: 0, lo: v as u128 }
    }

    /// Parse a decimal string of at most 40 digits (leading zeros allowed).
    pub fn parse_decimal(s: &str) -> Option<Version> {
        let s = s.trim_start_matches('0');
        if s.len() > 40 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if s.is_empty() {
            return Some(Version::default());
        }
        let split = s.len().saturating_sub(38);
        let (hi, lo) = s.split_at(split);
        Some(Version { hi: if hi.is_empty() { 0 } else { hi.parse().ok()? }, lo: lo.parse().ok()? })
    }

    /// The last `digits` decimal digits (at most 18): a short, stable number derived from a
    /// long sequence number.
    pub fn last_digits(&self, digits: u32) -> u64 {
        (self.lo % 10u128.pow(digits.min(18))) as u64
    }

    /// The value if it fits in 64 bits (always true for PostgreSQL LSNs).
    pub fn as_u64(&self) -> Option<u64> {
        if self.hi == 0 { u64::try_from(self.lo).ok() } else { None }
    }

    /// Zero-padded 40-digit form: byte-wise comparison of two padded strings is numeric
    /// comparison, which is what the server-side guards (Lua in Redis) rely on.
    pub fn padded(&self) -> String {
        format!("{:02}{:038}", self.hi, self.lo)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hi == 0 { write!(f, "{}", self.lo) } else { write!(f, "{}{:038}", self.hi, self.lo) }
    }
}

/// Where a change sits in its source, totally ordered within its partition. Used for
/// checkpoints, the DLQ and diagnostics; sinks use [`Version`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// PostgreSQL: the transaction's commit LSN and the change's index inside the transaction.
    Pg {
        /// Commit LSN of the transaction.
        commit_lsn: u64,
        /// 0-based index of the change within the transaction.
        seq: u32,
    },
    /// DynamoDB Streams: shard id and the record's sequence number.
    Ddb {
        /// Shard id.
        shard: Name,
        /// Record sequence number (up to 40 digits).
        sequence: Version,
    },
    /// A snapshot row: the consistent point's LSN (pg) or scan start (ddb), and the chunk.
    Snapshot {
        /// Consistent point the snapshot is ordered at.
        at: Version,
        /// Chunk number.
        chunk: u64,
    },
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Pg { commit_lsn, seq } => write!(f, "{}#{}", Lsn(*commit_lsn), seq),
            Position::Ddb { shard, sequence } => write!(f, "{shard}@{sequence}"),
            Position::Snapshot { at, chunk } => write!(f, "snapshot@{at}/chunk{chunk}"),
        }
    }
}

/// A PostgreSQL log sequence number, displayed the way PostgreSQL does (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| format!("not an LSN: {s:?}"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| format!("not an LSN: {s:?}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| format!("not an LSN: {s:?}"))?;
        Ok(Lsn((hi << 32) | lo))
    }
}

/// `origin` prefix of snapshot rows, followed by the pipeline that asked for them: only that
/// pipeline receives them (other pipelines on the table already have the rows).
pub const SNAPSHOT_ORIGIN: &str = "snapshot:";

/// One row change from any source.
#[derive(Debug, Clone)]
pub struct Change {
    /// Source name from the config.
    pub source: Name,
    /// `schema.table` (PostgreSQL) or table name (DynamoDB).
    pub relation: Name,
    /// What happened.
    pub op: Op,
    /// Primary-key columns/attributes; empty only for `Truncate`.
    pub key: Row,
    /// Old row: pg old tuple (REPLICA IDENTITY FULL, or the old key when the key changed),
    /// DynamoDB OldImage.
    pub before: Option<Row>,
    /// New row: pg new tuple, DynamoDB NewImage.
    pub after: Option<Row>,
    /// Columns the source did not send (pg TOAST-unchanged): never to be treated as NULL.
    pub unchanged: Vec<Name>,
    /// Where the change sits in its source.
    pub position: Position,
    /// What sinks compare to refuse stale writes.
    pub version: Version,
    /// Source commit time (pg commit timestamp, ddb ApproximateCreationDateTime).
    pub commit_time: Option<DateTime<Utc>>,
    /// PostgreSQL transaction id.
    pub tx: Option<u32>,
    /// Why the change happened when it was not an application write (e.g. `ttl-expiry`).
    pub origin: Option<Name>,
    /// This delete or insert is one half of an update that moved the row to a new primary key
    /// (see [`Change::split_key_change`]); pipelines that match `update` receive both halves.
    pub key_changed: bool,
}

#[cfg(test)]
impl Change {
    /// A PostgreSQL insert at LSN 1 with no commit time, for unit tests.
    pub fn test_insert(relation: &str, key: Row, after: Option<Row>) -> Change {
        Change {
            source: "s".into(),
            relation: relation.into(),
            op: Op::Insert,
            key,
            before: None,
            after,
            unchanged: vec![],
            position: Position::Pg { commit_lsn: 1, seq: 0 },
            version: Version::from_u64(1),
            commit_time: None,
            tx: None,
            origin: None,
            key_changed: false,
        }
    }
}

impl Change {
    /// Move TOAST-unchanged columns back into `after` when the old image carries them
    /// (PostgreSQL sends the whole old row with `REPLICA IDENTITY FULL`, and key columns with
    /// the old key). What stays in `unchanged` afterwards is a value polysync does not know.
    pub fn complete_unchanged(&mut self) {
        if self.unchanged.is_empty() {
            return;
        }
        let (Some(before), Some(after)) = (&self.before, &mut self.after) else { return };
        self.unchanged.retain(|name| match before.get(name) {
            Some(v) => {
                after.push(Arc::clone(name), v.clone());
                false
            }
            None => true,
        });
    }

    /// The key this change's old image shows, when it holds every key column.
    pub fn old_key(&self) -> Option<Row> {
        let before = self.before.as_ref()?;
        let mut old = Row::with_capacity(self.key.len());
        for (n, _) in self.key.iter() {
            old.push(Arc::clone(n), before.get(n)?.clone());
        }
        Some(old)
    }

    /// One meaning for a primary-key change in every sink: an update whose old image shows a
    /// different key becomes the delete of the old key followed by the insert of the new one,
    /// both marked [`Change::key_changed`]. This change becomes the insert; the delete, which
    /// comes first, is returned. Each half routes by its own key, so it is ordered with every
    /// other change of that key (a later re-insert of the old key lands after the delete).
    /// Positions are left for the source to renumber.
    pub fn split_key_change(&mut self) -> Option<Change> {
        if self.op != Op::Update || self.key.is_empty() {
            return None;
        }
        let old = self.old_key().filter(|old| *old != self.key)?;
        let mut delete = self.clone();
        delete.op = Op::Delete;
        delete.key = old;
        delete.after = None;
        delete.unchanged = Vec::new();
        delete.key_changed = true;
        self.op = Op::Insert;
        self.before = None;
        self.key_changed = true;
        Some(delete)
    }

    /// True when `column` of the new row was not sent by the source (TOAST-unchanged).
    pub fn is_unchanged(&self, column: &str) -> bool {
        self.unchanged.iter().any(|u| &**u == column)
    }

    /// The row a template should read by default: the new row, or the old one for deletes.
    pub fn row(&self) -> Option<&Row> {
        self.after.as_ref().or(self.before.as_ref())
    }

    /// Display form of the key for logs and error messages (`id=42,region=eu`).
    pub fn key_display(&self) -> String {
        let mut s = String::new();
        for (i, (n, v)) in self.key.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(n);
            s.push('=');
            match v.template_text() {
                Some(t) => s.push_str(&t),
                None => s.push_str(v.type_word()),
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_orders_numerically_up_to_40_digits() {
        let a = Version::parse_decimal("9999999999999999999999999999999999999999").unwrap();
        let b = Version::parse_decimal("10000000000000000000000000000000000000000");
        assert!(b.is_none(), "41 digits must be refused");
        let c = Version::parse_decimal("0000000000000000000000000000000000000123").unwrap();
        let d = Version::parse_decimal("1000000000000000000000000000000000000000").unwrap();
        assert!(c < d && d < a);
        assert_eq!(a.to_string(), "9999999999999999999999999999999999999999");
        assert_eq!(c.to_string(), "123");
        assert_eq!(d.to_string(), "1000000000000000000000000000000000000000");
        assert_eq!(c.padded().len(), 40);
        assert!(c.padded() < d.padded() && d.padded() < a.padded());
        assert_eq!(Version::from_u64(u64::MAX).as_u64(), Some(u64::MAX));
        assert_eq!(d.as_u64(), None);
    }

    #[test]
    fn lsn_round_trips_postgres_text() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
    }
}
