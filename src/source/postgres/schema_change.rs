//! Column changes mid-stream (`ALTER TABLE … ADD/DROP/RENAME COLUMN`, `ALTER COLUMN … TYPE`).
//!
//! PostgreSQL sends no change for the rows an `ALTER TABLE` reshapes: after `ADD COLUMN … DEFAULT
//! 5` every existing row has the column, but their copies in the sinks do not. The stream sees
//! the new shape in the next Relation message of the table; this module tells a real change from
//! a replay of older history and names what changed, so the source can re-read the table
//! (`on_column_change = "resnapshot"`) or say that the copies are stale (`"warn"`).
//!
//! What was last seen is kept in `state_dir/schema-<source>.json`, with the commit LSN of the
//! first transaction of that shape: after a restart, the stream replays from the confirmed
//! position and sees older shapes again, which are not changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A table's shape: column names and type OIDs, in column order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// `(name, type OID)` per column.
    pub columns: Vec<(String, u32)>,
    /// Commit LSN of the first transaction seen with this shape.
    pub since_lsn: u64,
}

/// What a new Relation message means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// The first shape ever seen for the table: recorded, nothing to do.
    First,
    /// The shape already recorded.
    Same,
    /// An older shape, seen again while replaying from the confirmed position.
    Replay,
    /// The table's columns changed; `describe` names how.
    Changed {
        /// e.g. `added note, extra; retyped qty`.
        describe: String,
        /// Which kinds of change, for the metric (`added`, `dropped`, `renamed`, `retyped`).
        kinds: Vec<&'static str>,
        /// The new shape, to record once the re-read is durably queued.
        shape: Shape,
    },
}

/// Name the differences between two shapes. A column at the same position with another name
/// and the same type, with the column count unchanged, is a rename (Relation messages carry
/// no attribute numbers; this is the reading that matches `RENAME COLUMN`).
pub fn compare(old: &[(String, u32)], new: &[(String, u32)]) -> (String, Vec<&'static str>) {
    let mut parts = Vec::new();
    let mut kinds = Vec::new();
    if old.len() == new.len() {
        let renamed: Vec<String> = old
            .iter()
            .zip(new)
            .filter(|(o, n)| o.0 != n.0 && o.1 == n.1 && !old.iter().any(|x| x.0 == n.0))
            .map(|(o, n)| format!("{} → {}", o.0, n.0))
            .collect();
        if !renamed.is_empty() {
            parts.push(format!("renamed {}", renamed.join(", ")));
            kinds.push("renamed");
        }
    }
    let renamed_to = |name: &str| parts.iter().any(|p| p.contains(&format!("→ {name}")));
    let renamed_from = |name: &str| parts.iter().any(|p| p.contains(&format!("{name} →")));
    let added: Vec<&str> =
        new.iter().filter(|n| !old.iter().any(|o| o.0 == n.0) && !renamed_to(&n.0)).map(|n| n.0.as_str()).collect();
    let dropped: Vec<&str> =
        old.iter().filter(|o| !new.iter().any(|n| n.0 == o.0) && !renamed_from(&o.0)).map(|o| o.0.as_str()).collect();
    let retyped: Vec<&str> =
        new.iter().filter(|n| old.iter().any(|o| o.0 == n.0 && o.1 != n.1)).map(|n| n.0.as_str()).collect();
    for (word, cols) in [("added", added), ("dropped", dropped), ("retyped", retyped)] {
        if !cols.is_empty() {
            parts.push(format!("{word} {}", cols.join(", ")));
            kinds.push(word);
        }
    }
    (parts.join("; "), kinds)
}

/// The shapes a source has seen, persisted.
pub struct SchemaLog {
    path: PathBuf,
    tables: std::sync::Arc<Mutex<BTreeMap<String, Shape>>>,
}

/// `state_dir/schema-<source>.json`.
pub fn schema_path(state_dir: &Path, source: &str) -> PathBuf {
    state_dir.join(format!("schema-{source}.json"))
}

impl SchemaLog {
    /// Load the log (empty if the file does not exist or cannot be read: the next shapes seen
    /// are then first shapes, which is what a fresh state directory means).
    pub fn load(path: PathBuf) -> SchemaLog {
        let tables = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        SchemaLog { path, tables: std::sync::Arc::new(Mutex::new(tables)) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Shape>> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take the shapes the catalog read at start as the baseline of tables never seen before
    /// (a table's rows were copied with the shape it had then; a first start streams from a
    /// new slot, so nothing older is replayed).
    pub fn baseline<'a>(&self, shapes: impl IntoIterator<Item = (&'a String, &'a Vec<(String, u32)>)>) {
        let mut tables = self.lock();
        let mut added = false;
        for (table, columns) in shapes {
            if !tables.contains_key(table) {
                tables.insert(table.clone(), Shape { columns: columns.clone(), since_lsn: 0 });
                added = true;
            }
        }
        drop(tables);
        if added {
            self.save_logged();
        }
    }

    /// Judge the shape of `table` seen in a transaction committing at `lsn`. A first shape is
    /// recorded at once.
    pub fn observe(&self, table: &str, columns: Vec<(String, u32)>, lsn: u64) -> Observation {
        let mut tables = self.lock();
        match tables.get(table) {
            None => {
                tables.insert(table.to_string(), Shape { columns, since_lsn: lsn });
                drop(tables);
                self.save_logged();
                Observation::First
            }
            Some(s) if s.columns == columns => Observation::Same,
            Some(s) if lsn < s.since_lsn => Observation::Replay,
            Some(s) => {
                let (describe, kinds) = compare(&s.columns, &columns);
                Observation::Changed { describe, kinds, shape: Shape { columns, since_lsn: lsn } }
            }
        }
    }

    /// Record `shape` as the table's current one (after its re-read is queued durably).
    pub fn record(&self, table: &str, shape: Shape) {
        self.lock().insert(table.to_string(), shape);
        self.save_logged();
    }

    /// Write the shapes off the async threads (the stream calls this). Each write takes the
    /// shapes as they are when it runs, under the map's lock, so the file ends at the latest.
    fn save_logged(&self) {
        let (tables, path) = (std::sync::Arc::clone(&self.tables), self.path.clone());
        let write = move || {
            let tables = tables.lock().unwrap_or_else(|p| p.into_inner());
            let bytes = serde_json::to_vec_pretty(&*tables).unwrap_or_default();
            if let Err(e) = crate::checkpoint::file::write_atomic(&path, &bytes) {
                // Not fatal: a shape not recorded is judged again after a restart (a change is
                // then seen a second time, never missed).
                tracing::warn!(path = %path.display(), error = %e, "could not save the table shapes");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(write)),
            Err(_) => write(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(c: &[(&str, u32)]) -> Vec<(String, u32)> {
        c.iter().map(|(n, t)| (n.to_string(), *t)).collect()
    }

    #[test]
    fn names_each_kind_of_change() {
        let old = cols(&[("id", 20), ("name", 25), ("qty", 23)]);
        assert_eq!(compare(&old, &cols(&[("id", 20), ("name", 25), ("qty", 23), ("note", 25)])).0, "added note");
        assert_eq!(compare(&old, &cols(&[("id", 20), ("qty", 23)])).0, "dropped name");
        assert_eq!(compare(&old, &cols(&[("id", 20), ("title", 25), ("qty", 23)])).0, "renamed name → title");
        assert_eq!(
            compare(&old, &cols(&[("id", 20), ("name", 25), ("qty", 25)])),
            ("retyped qty".into(), vec!["retyped"])
        );
    }

    #[test]
    fn replays_of_older_shapes_are_not_changes_and_shapes_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = schema_path(dir.path(), "db");
        let log = SchemaLog::load(path.clone());
        let a = cols(&[("id", 20)]);
        let b = cols(&[("id", 20), ("x", 23)]);
        assert_eq!(log.observe("public.t", a.clone(), 100), Observation::First);
        assert_eq!(log.observe("public.t", a.clone(), 150), Observation::Same);
        let Observation::Changed { shape, kinds, .. } = log.observe("public.t", b.clone(), 200) else { panic!() };
        assert_eq!(kinds, vec!["added"]);
        log.record("public.t", shape);
        let again = SchemaLog::load(path);
        assert_eq!(again.observe("public.t", a, 180), Observation::Replay, "older history replayed after a restart");
        assert_eq!(again.observe("public.t", b, 200), Observation::Same);
    }
}
