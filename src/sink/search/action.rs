//! The search action a pipeline asks for: index the document (or delete it) under templated
//! index and id, versioned so replays can never roll it back.
//!
//! ```toml
//! [[sink]]
//! target   = "search"
//! index    = "catalog"           # template
//! id       = "{{ key.id }}"      # template
//! document = "row"               # the (transformed) row; or a path into the transform's
//!                                # output, e.g. "event.doc"
//! columns  = ["id", "name"]      # optional, with document = "row"
//! ```

use std::sync::Arc;

use serde::Deserialize;

use crate::change::json::{row_to_natural, write_natural};
use crate::change::template::{Path, Root, Scope, Template};
use crate::change::{Change, Op};
use crate::sink::version::external_version;
use crate::sink::{Action, Payload};

/// What the search sink does for one change.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SearchOp {
    /// Index name.
    pub index: String,
    /// Document id.
    pub id: String,
    /// External version (`external_gte`).
    pub version: i64,
    /// Index this JSON document, or delete when `None`.
    pub document: Option<String>,
    /// Routing value, if configured.
    pub routing: Option<String>,
    /// Set when the source did not send some of the row's columns (unchanged TOAST values):
    /// the stored document's fields are kept where the new one lacks them.
    pub keep: Option<Keep>,
}

/// Which stored fields a partial document keeps.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Keep {
    /// These fields (the unsent columns of a row document).
    Fields(Vec<String>),
    /// Every top-level field the new document does not have (a transform's document, whose
    /// fields polysync cannot map back to columns).
    Absent,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    #[allow(dead_code)]
    target: String,
    index: String,
    id: String,
    #[serde(default)]
    document: Option<String>,
    #[serde(default)]
    columns: Option<Vec<String>>,
    #[serde(default)]
    routing: Option<String>,
    #[serde(default)]
    on_truncate: Option<String>,
}

enum Document {
    Row(Option<Vec<String>>),
    Path(Path),
}

/// Compiled search action.
pub struct Index {
    index: Template,
    id: Template,
    routing: Option<Template>,
    document: Document,
    max_document_bytes: usize,
    /// A truncate empties the index (default), or is ignored.
    clear_on_truncate: bool,
}

/// Compile a `[[sink]]` table aimed at a search target.
pub fn compile(table: toml::Table, max_document_bytes: usize) -> Result<Arc<dyn Action>, String> {
    let raw: RawAction = crate::sink::parse_action(table)?;
    let tpl = |s: &str| Template::parse(s).map_err(|e| format!("template {s:?}: {}", e.msg));
    let document = match raw.document.as_deref().unwrap_or("row") {
        "row" => Document::Row(raw.columns),
        path => {
            if raw.columns.is_some() {
                return Err("columns applies to document = \"row\" only".into());
            }
            let p = Path::parse(path).map_err(|e| format!("document {path:?}: {e}"))?;
            if !matches!(p.root, Root::Event | Root::After | Root::Before | Root::Row) {
                return Err(format!("document {path:?} must name an object: row, after.…, or event.…"));
            }
            Document::Path(p)
        }
    };
    let clear_on_truncate = match raw.on_truncate.as_deref().unwrap_or("delete") {
        "delete" => true,
        "ignore" => false,
        other => return Err(format!("on_truncate {other:?} is not \"delete\" or \"ignore\"")),
    };
    Ok(Arc::new(Index {
        clear_on_truncate,
        index: tpl(&raw.index)?,
        id: tpl(&raw.id)?,
        routing: raw.routing.as_deref().map(tpl).transpose()?,
        document,
        max_document_bytes,
    }))
}

fn check_index_name(name: &str) -> Result<(), String> {
    let bad = name.is_empty()
        || name.len() > 255
        || name.starts_with(['-', '_', '+'])
        || name == "."
        || name == ".."
        || name.chars().any(|c| c.is_uppercase() || "\\/*?\"<>| ,#:".contains(c));
    if bad { Err(format!("{name:?} is not a valid index name")) } else { Ok(()) }
}

impl Action for Index {
    fn render(&self, scope: &dyn Scope, change: &Change, out: &mut Vec<Payload>) -> Result<(), String> {
        if change.op == Op::Truncate {
            if !self.clear_on_truncate {
                return Ok(());
            }
            // Every document of the table goes: the index is emptied (after every earlier
            // change of this sink is applied, and before any later one: truncates are barriers).
            let index = self.index.render(scope).map_err(|e| {
                format!(
                    "truncate of {}: the index name {} depends on row data ({e}), so the documents to remove cannot be found; use an index per table, or on_truncate = \"ignore\"",
                    change.relation, self.index
                )
            })?;
            check_index_name(&index)?;
            out.push(Payload::SearchClear { index });
            return Ok(());
        }
        let index = self.index.render(scope).map_err(|e| e.to_string())?;
        check_index_name(&index)?;
        let id = self.id.render(scope).map_err(|e| e.to_string())?;
        if id.is_empty() || id.len() > 512 {
            return Err(format!("document id of {} bytes (must be 1 to 512)", id.len()));
        }
        let version = external_version(change)?;
        let routing = self.routing.as_ref().map(|r| r.render(scope)).transpose().map_err(|e| e.to_string())?;
        let mut keep = None;
        let document = if change.op == Op::Delete {
            None
        } else {
            let json = match &self.document {
                Document::Row(columns) => {
                    let row = change.after.as_ref().ok_or("no row to index (after is empty)")?;
                    let unsent: Vec<String> = change
                        .unchanged
                        .iter()
                        .filter(|u| columns.as_ref().is_none_or(|c| c.iter().any(|x| x == &***u)))
                        .map(|u| u.to_string())
                        .collect();
                    if !unsent.is_empty() {
                        keep = Some(Keep::Fields(unsent));
                    }
                    row_to_natural(row, columns.as_deref()).map_err(|e| e.to_string())?
                }
                Document::Path(p) => {
                    if !change.unchanged.is_empty() {
                        keep = Some(Keep::Absent);
                    }
                    let v = scope.resolve(p).ok_or_else(|| format!("document {p} is missing"))?;
                    if !matches!(&*v, crate::change::Value::Map(_) | crate::change::Value::Json(_)) {
                        return Err(format!("document {p} is {}, not an object", v.type_word()));
                    }
                    let mut s = String::new();
                    write_natural(&mut s, &v, &p.to_string()).map_err(|e| e.to_string())?;
                    s
                }
            };
            if json.len() > self.max_document_bytes {
                return Err(format!(
                    "document is {} bytes, over max_document_bytes ({})",
                    json.len(),
                    self.max_document_bytes
                ));
            }
            Some(json)
        };
        out.push(Payload::Search(SearchOp { index, id, version, document, routing, keep }));
        Ok(())
    }

    fn paths(&self) -> Vec<&Path> {
        let mut p: Vec<&Path> = self.index.paths().chain(self.id.paths()).collect();
        if let Some(r) = &self.routing {
            p.extend(r.paths());
        }
        if let Document::Path(d) = &self.document {
            p.push(d);
        }
        p
    }

    fn columns(&self) -> Vec<&str> {
        match &self.document {
            Document::Row(Some(c)) => c.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        }
    }

    fn describe(&self) -> String {
        let doc = match &self.document {
            Document::Row(_) => "row".to_string(),
            Document::Path(p) => p.to_string(),
        };
        format!("index {} id {} document {doc} (external_gte versions)", self.index, self.id)
    }
}
