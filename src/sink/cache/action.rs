//! The cache actions a pipeline can ask for:
//!
//! * `invalidate`: delete every key the `keys` templates name (the cache-aside pattern: the
//!   application reloads from the database on its next miss);
//! * `set`: write the row (JSON string or hash) under `key`, guarded by the change's version
//!   so a replayed or late older change can never overwrite a newer value; deletes leave a
//!   version tombstone for `tombstone_ttl`.
//!
//! Truncates carry no key; with `truncate_pattern` every key matching it is removed, without it
//! the truncate is dead-lettered (visible) rather than ignored.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::config::CacheSinkConfig;
use crate::change::json::{row_to_natural, write_natural};
use crate::change::template::{Path, Scope, Template};
use crate::change::{Change, Op, Row, Value};
use crate::sink::{Action, Payload};

/// Redis refuses keys over 512 MB; ElastiCache operators want far less. Keys longer than this
/// are dead-lettered, not written.
pub const MAX_KEY_BYTES: usize = 64 * 1024;

/// What the cache sink does for one change.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum CacheOp {
    /// Delete these keys.
    Invalidate {
        /// Keys.
        keys: Vec<String>,
    },
    /// Version-guarded write.
    Set {
        /// Value key.
        key: String,
        /// Where the version is kept (same cluster slot as `key`).
        version_key: String,
        /// Zero-padded version.
        version: String,
        /// The value.
        value: SetValue,
        /// Expiry of key and version, if any.
        ttl: Option<Duration>,
    },
    /// Version-guarded delete leaving a tombstone version.
    Delete {
        /// Value key.
        key: String,
        /// Version key.
        version_key: String,
        /// Zero-padded version.
        version: String,
    },
    /// Remove every key matching a pattern (truncate).
    DeletePattern {
        /// SCAN MATCH pattern.
        pattern: String,
    },
}

/// A value for `set`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SetValue {
    /// A JSON string.
    Json(String),
    /// Hash fields; `replace` drops fields not listed, otherwise they are kept (TOAST-unchanged
    /// columns: a hash that does not exist is then left absent rather than created from part
    /// of the row) and `remove` lists fields to delete (NULL columns).
    Hash {
        /// Replace the whole hash.
        replace: bool,
        /// Field → value.
        fields: Vec<(String, Vec<u8>)>,
        /// Fields to delete.
        remove: Vec<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    #[allow(dead_code)]
    target: String,
    action: String,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    columns: Option<Vec<String>>,
    #[serde(default, with = "crate::config::duration_opt")]
    ttl: Option<Duration>,
    #[serde(default)]
    truncate_pattern: Option<String>,
}

/// Value layout for `set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON string per key.
    Json,
    /// One hash per key, a field per column.
    Hash,
}

/// Compiled `invalidate`.
pub struct Invalidate {
    target: String,
    keys: Vec<Template>,
    truncate_pattern: Option<String>,
}

/// Compiled `set`.
pub struct Set {
    target: String,
    key: Template,
    format: Format,
    columns: Option<Vec<String>>,
    ttl: Option<Duration>,
    truncate_pattern: Option<String>,
}

/// Compile a `[[sink]]` table aimed at a cache target.
pub fn compile(_cfg: &CacheSinkConfig, target: &str, table: toml::Table) -> Result<Arc<dyn Action>, String> {
    let raw: RawAction = crate::sink::parse_action(table)?;
    let tpl = |s: &str| Template::parse(s).map_err(|e| format!("template {s:?}: {}", e.msg));
    match raw.action.as_str() {
        "invalidate" => {
            if raw.keys.is_empty() {
                return Err("action \"invalidate\" needs keys = [\"…{{ key.id }}\"]".into());
            }
            if raw.key.is_some() || raw.format.is_some() || raw.columns.is_some() || raw.ttl.is_some() {
                return Err("action \"invalidate\" takes keys (and truncate_pattern) only".into());
            }
            Ok(Arc::new(Invalidate {
                target: target.to_string(),
                keys: raw.keys.iter().map(|k| tpl(k)).collect::<Result<_, _>>()?,
                truncate_pattern: raw.truncate_pattern,
            }))
        }
        "set" => {
            let key = raw.key.as_deref().ok_or("action \"set\" needs key = \"…{{ key.id }}\"")?;
            if !raw.keys.is_empty() {
                return Err("action \"set\" takes one key, not keys".into());
            }
            let format = match raw.format.as_deref().unwrap_or("json") {
                "json" => Format::Json,
                "hash" => Format::Hash,
                other => return Err(format!("format {other:?} is not \"json\" or \"hash\"")),
            };
            Ok(Arc::new(Set {
                target: target.to_string(),
                key: tpl(key)?,
                format,
                columns: raw.columns,
                ttl: raw.ttl,
                truncate_pattern: raw.truncate_pattern,
            }))
        }
        other => Err(format!("unknown cache action {other:?}; use \"invalidate\" or \"set\"")),
    }
}

fn check_key(k: String) -> Result<String, String> {
    if k.len() > MAX_KEY_BYTES {
        return Err(format!("cache key is {} bytes, over the {MAX_KEY_BYTES}-byte limit", k.len()));
    }
    Ok(k)
}

/// The key that holds `key`'s version. It must hash to the same cluster slot: if `key` has a
/// hash tag (`{…}`), appending keeps it; otherwise the whole key becomes the tag.
pub fn version_key(key: &str) -> String {
    let has_tag = key.find('{').and_then(|open| key[open + 1..].find('}').map(|close| close > 0)).unwrap_or(false);
    if has_tag { format!("{key}:__version") } else { format!("{{{key}}}:__version") }
}

fn truncate(pattern: &Option<String>, target: &str, change: &Change, out: &mut Vec<Payload>) -> Result<(), String> {
    match pattern {
        Some(p) => {
            out.push(Payload::Cache(CacheOp::DeletePattern { pattern: p.clone() }));
            Ok(())
        }
        None => Err(format!(
            "truncate of {} cannot be mapped to cache keys; set truncate_pattern on the {target} action",
            change.relation
        )),
    }
}

impl Action for Invalidate {
    fn render(&self, scope: &dyn Scope, change: &Change, out: &mut Vec<Payload>) -> Result<(), String> {
        if change.op == Op::Truncate {
            return truncate(&self.truncate_pattern, &self.target, change, out);
        }
        let mut keys = Vec::with_capacity(self.keys.len());
        for t in &self.keys {
            keys.push(check_key(t.render(scope).map_err(|e| e.to_string())?)?);
        }
        out.push(Payload::Cache(CacheOp::Invalidate { keys }));
        Ok(())
    }

    fn paths(&self) -> Vec<&Path> {
        self.keys.iter().flat_map(|t| t.paths()).collect()
    }

    fn describe(&self) -> String {
        let keys: Vec<String> = self.keys.iter().map(|k| k.to_string()).collect();
        format!("invalidate {}", keys.join(", "))
    }
}

fn hash_bytes(v: &Value, field: &str) -> Result<Option<Vec<u8>>, String> {
    Ok(Some(match v {
        Value::Null => return Ok(None),
        Value::Bytes(b) => b.clone(),
        Value::List(_) | Value::Map(_) | Value::Set(_) | Value::Json(_) => {
            let mut s = String::new();
            write_natural(&mut s, v, field).map_err(|e| e.to_string())?;
            s.into_bytes()
        }
        Value::Float(f) if !f.is_finite() => {
            return Err(format!("{field}: float {f} cannot be cached (the pipeline's non_finite = \"reject\")"));
        }
        Value::Float(_) => {
            let mut s = String::new();
            write_natural(&mut s, v, field).map_err(|e| e.to_string())?;
            s.into_bytes()
        }
        Value::Decimal(d)
            if !d
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'e' || b == b'E' || b == b'+') =>
        {
            return Err(format!("{field}: numeric {d} cannot be cached (the pipeline's non_finite = \"reject\")"));
        }
        other => other.template_text().map(|t| t.into_owned().into_bytes()).unwrap_or_default(),
    }))
}

impl Set {
    /// The value to write, or `None` when it cannot be written whole. Columns the source did
    /// not send (TOAST-unchanged, and not completed from an old image) are merged: a hash keeps
    /// its stored fields (and is not created from part of a row), while a JSON string cannot be
    /// patched, so the key is removed (version-guarded) and the next read reloads it.
    fn value(&self, change: &Change, row: &Row) -> Result<Option<SetValue>, String> {
        let wanted = |name: &str| self.columns.as_ref().is_none_or(|c| c.iter().any(|x| x == name));
        let partial = change.unchanged.iter().any(|n| wanted(n));
        match self.format {
            Format::Json => {
                if partial {
                    return Ok(None);
                }
                Ok(Some(SetValue::Json(row_to_natural(row, self.columns.as_deref()).map_err(|e| e.to_string())?)))
            }
            Format::Hash => {
                let mut fields = Vec::with_capacity(row.len());
                let mut remove = Vec::new();
                for (n, v) in row.iter() {
                    if !wanted(n) {
                        continue;
                    }
                    match hash_bytes(v, n)? {
                        Some(b) => fields.push((n.to_string(), b)),
                        None => remove.push(n.to_string()),
                    }
                }
                Ok(Some(SetValue::Hash { replace: !partial, fields, remove }))
            }
        }
    }
}

impl Action for Set {
    fn render(&self, scope: &dyn Scope, change: &Change, out: &mut Vec<Payload>) -> Result<(), String> {
        if change.op == Op::Truncate {
            return truncate(&self.truncate_pattern, &self.target, change, out);
        }
        let key = check_key(self.key.render(scope).map_err(|e| e.to_string())?)?;
        let version_key = version_key(&key);
        let version = crate::sink::version::cache_version(change)?;
        let row = match change.op {
            Op::Delete => None,
            _ => change.after.as_ref(),
        };
        let op = match row {
            None => CacheOp::Delete { key, version_key, version },
            Some(row) => match self.value(change, row)? {
                Some(value) => CacheOp::Set { key, version_key, version, value, ttl: self.ttl },
                None => CacheOp::Delete { key, version_key, version },
            },
        };
        out.push(Payload::Cache(op));
        Ok(())
    }

    fn paths(&self) -> Vec<&Path> {
        self.key.paths().collect()
    }

    fn columns(&self) -> Vec<&str> {
        self.columns.iter().flatten().map(String::as_str).collect()
    }

    fn describe(&self) -> String {
        let fmt = match self.format {
            Format::Json => "json",
            Format::Hash => "hash",
        };
        format!("set {} ({fmt}, version-guarded)", self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_key_stays_in_the_same_slot() {
        assert_eq!(version_key("cart:42"), "{cart:42}:__version");
        assert_eq!(version_key("{user:1}:cart"), "{user:1}:cart:__version");
    }
}
