//! Graph mappings: how a change becomes vertex and edge upserts or drops.
//!
//! ```toml
//! [[sink]]
//! target = "graph"
//! [[sink.vertex]]
//! label = "product"
//! id = "product:{{ key.id }}"
//! properties = { name = "after.name", price = "after.price" }   # a path keeps the value's type
//! on_delete = "drop"                                             # default "keep"
//! [[sink.edge]]
//! label = "purchased"
//! id = "purchased:{{ key.order_id }}:{{ key.product_id }}"        # deterministic: replays never duplicate
//! from = { label = "user", id = "user:{{ row.user_id }}" }
//! to = { label = "product", id = "product:{{ key.product_id }}" }
//! properties = { order_id = "key.order_id", at = "row.created_at", note = "order {{ key.order_id }}" }
//! ```
//!
//! A property value containing `{{` is a template (text); otherwise it is a path whose value
//! keeps its type (numbers, booleans, timestamps as dates, decimals as exact strings). A NULL
//! removes the property. Endpoint vertices are created as stubs (label and id) when missing,
//! so an edge never fails because the other side's change has not arrived yet. A delete drops
//! the edge (and the vertex when `on_delete = "drop"`); an update that moves an edge (its
//! endpoints or id change) drops the old one and merges the new one in the same request.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use serde::Deserialize;

use super::gremlin::GValue;
use crate::change::json::write_natural;
use crate::change::scope::ChangeScope;
use crate::change::template::{Path, Root, Scope, Template};
use crate::change::{Change, Op, Value};
use crate::sink::{Action, Payload};

/// A property value: the scalar kinds a graph property takes from a column.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum PropValue {
    /// Boolean.
    Bool(bool),
    /// 64-bit integer.
    Int(i64),
    /// Double.
    Double(f64),
    /// Text (decimals keep their digits; bytes are base64; containers are JSON).
    Str(String),
    /// A date, milliseconds since the epoch.
    Date(i64),
}

impl From<&PropValue> for GValue {
    fn from(v: &PropValue) -> GValue {
        match v {
            PropValue::Bool(b) => GValue::Bool(*b),
            PropValue::Int(i) => GValue::Int(*i),
            PropValue::Double(d) => GValue::Double(*d),
            PropValue::Str(s) => GValue::Str(s.clone()),
            PropValue::Date(ms) => GValue::Date(*ms),
        }
    }
}

/// One write against the graph.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum GraphOp {
    /// Upsert a vertex; properties with `None` are removed.
    Vertex {
        /// Vertex id.
        id: String,
        /// Label (used when the vertex is created).
        label: String,
        /// Properties.
        props: Vec<(String, Option<PropValue>)>,
    },
    /// Drop a vertex (and its edges).
    DropVertex {
        /// Vertex id.
        id: String,
    },
    /// Upsert an edge between two vertices (created as stubs when missing).
    Edge {
        /// Edge id.
        id: String,
        /// Edge label.
        label: String,
        /// (label, id) of the out vertex.
        from: (String, String),
        /// (label, id) of the in vertex.
        to: (String, String),
        /// Properties.
        props: Vec<(String, Option<PropValue>)>,
    },
    /// Drop every vertex (or edge) with this label: a truncate of a table whose mapping drops
    /// its vertices on delete (edges always go with their row).
    DropLabel {
        /// Vertices (true) or edges.
        vertices: bool,
        /// The label.
        label: String,
    },
    /// Drop an edge; `from` (its out vertex) lets the drop join a batched traversal.
    DropEdge {
        /// Edge id.
        id: String,
        /// Out vertex id, when known.
        from: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnd {
    label: String,
    id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVertex {
    label: String,
    id: String,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    #[serde(default)]
    on_delete: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdge {
    label: String,
    id: String,
    from: RawEnd,
    to: RawEnd,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    #[allow(dead_code)]
    target: String,
    #[serde(default)]
    vertex: Vec<RawVertex>,
    #[serde(default)]
    edge: Vec<RawEdge>,
}

enum PropSpec {
    Template(Template),
    Path(Path),
}

struct End {
    label: Template,
    id: Template,
}

struct VertexMap {
    label: Template,
    id: Template,
    props: Vec<(String, PropSpec)>,
    drop_on_delete: bool,
}

struct EdgeMap {
    label: Template,
    id: Template,
    from: End,
    to: End,
    props: Vec<(String, PropSpec)>,
    /// id/from/to read only key columns: they cannot change without a key change.
    key_only: bool,
}

/// Compiled graph mapping.
pub struct GraphMapping {
    vertices: Vec<VertexMap>,
    edges: Vec<EdgeMap>,
}

fn tpl(s: &str) -> Result<Template, String> {
    Template::parse(s).map_err(|e| format!("template {s:?}: {}", e.msg))
}

fn props(raw: BTreeMap<String, String>) -> Result<Vec<(String, PropSpec)>, String> {
    raw.into_iter()
        .map(|(k, v)| {
            if k.is_empty() {
                return Err("empty property name".to_string());
            }
            let spec = if v.contains("{{") {
                PropSpec::Template(tpl(&v)?)
            } else {
                PropSpec::Path(Path::parse(&v).map_err(|e| format!("property {k}: {e}"))?)
            };
            Ok((k, spec))
        })
        .collect()
}

/// Compile a `[[sink]]` table aimed at a graph target.
pub fn compile(table: toml::Table) -> Result<Arc<dyn Action>, String> {
    let raw: RawAction = crate::sink::parse_action(table)?;
    if raw.vertex.is_empty() && raw.edge.is_empty() {
        return Err("a graph sink needs at least one [[sink.vertex]] or [[sink.edge]]".into());
    }
    let vertices = raw
        .vertex
        .into_iter()
        .map(|v| {
            let drop_on_delete = match v.on_delete.as_deref().unwrap_or("keep") {
                "keep" => false,
                "drop" => true,
                o => return Err(format!("on_delete {o:?} is not \"keep\" or \"drop\"")),
            };
            Ok(VertexMap { label: tpl(&v.label)?, id: tpl(&v.id)?, props: props(v.properties)?, drop_on_delete })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let edges = raw
        .edge
        .into_iter()
        .map(|e| {
            let (id, from_id, to_id) = (tpl(&e.id)?, tpl(&e.from.id)?, tpl(&e.to.id)?);
            let key_only = [&id, &from_id, &to_id].iter().flat_map(|t| t.paths()).all(|p| p.root == Root::Key);
            Ok(EdgeMap {
                label: tpl(&e.label)?,
                id,
                from: End { label: tpl(&e.from.label)?, id: from_id },
                to: End { label: tpl(&e.to.label)?, id: to_id },
                props: props(e.properties)?,
                key_only,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Arc::new(GraphMapping { vertices, edges }))
}

/// A value as a graph property; `None` for NULL (the property is removed).
pub fn to_gvalue(v: &Value) -> Option<PropValue> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => PropValue::Bool(*b),
        Value::Int(i) => PropValue::Int(*i),
        Value::Float(f) => PropValue::Double(*f),
        Value::Timestamp(t) => PropValue::Date(t.timestamp_millis()),
        Value::Decimal(s) | Value::Text(s) | Value::Uuid(s) | Value::Json(s) => PropValue::Str(s.clone()),
        Value::Other { text, .. } => PropValue::Str(text.clone()),
        Value::Date(d) => PropValue::Str(d.to_string()),
        Value::Bytes(b) => PropValue::Str(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::List(_) | Value::Set(_) | Value::Map(_) => {
            let mut s = String::new();
            let _ = write_natural(&mut s, v, "");
            PropValue::Str(s)
        }
    })
}

/// Properties to set (`None` removes one). A property read from a column the source did not
/// send (TOAST-unchanged) is left out, so the stored value stays: properties merge.
fn render_props(specs: &[(String, PropSpec)], scope: &dyn Scope) -> Result<Vec<(String, Option<PropValue>)>, String> {
    let mut out = Vec::with_capacity(specs.len());
    for (k, spec) in specs {
        let v = match spec {
            PropSpec::Template(t) => {
                if t.paths().any(|p| scope.unchanged(p)) {
                    continue;
                }
                Some(PropValue::Str(t.render(scope).map_err(|e| format!("property {k}: {e}"))?))
            }
            PropSpec::Path(p) => {
                if scope.unchanged(p) {
                    continue;
                }
                let v = scope.resolve(p).ok_or_else(|| format!("property {k}: template field {p} is missing"))?;
                to_gvalue(&v)
            }
        };
        out.push((k.clone(), v));
    }
    Ok(out)
}

fn check_id(what: &str, s: String) -> Result<String, String> {
    if s.is_empty() || s.len() > 4096 {
        return Err(format!("{what} id of {} bytes (must be 1 to 4096)", s.len()));
    }
    Ok(s)
}

/// The change as it looked before: the old row for `row`/`after`, the old key when the key
/// changed. `None` when there is no old image.
fn old_view(change: &Change) -> Option<Change> {
    let before = change.before.clone()?;
    let mut old = change.clone();
    if change.key.iter().all(|(n, _)| before.get(n).is_some()) {
        old.key =
            change.key.iter().map(|(n, _)| (Arc::clone(n), before.get(n).cloned().unwrap_or(Value::Null))).collect();
    }
    old.after = Some(before);
    old.before = None;
    Some(old)
}

/// An edge's id and its (label, id) endpoints.
type Ends = (String, (String, String), (String, String));

impl EdgeMap {
    fn ends(&self, scope: &dyn Scope) -> Result<Ends, String> {
        let r = |t: &Template| t.render(scope).map_err(|e| e.to_string());
        Ok((
            check_id("edge", r(&self.id)?)?,
            (r(&self.from.label)?, check_id("vertex", r(&self.from.id)?)?),
            (r(&self.to.label)?, check_id("vertex", r(&self.to.id)?)?),
        ))
    }
}

impl Action for GraphMapping {
    fn render(&self, scope: &dyn Scope, change: &Change, out: &mut Vec<Payload>) -> Result<(), String> {
        if change.op == Op::Truncate {
            // A truncate deletes every row: what a delete drops, the truncate drops for all rows
            // of the mapping, by label (after every earlier change and before any later one:
            // truncates are barriers). Vertices kept on delete are kept here too.
            let label = |t: &Template| {
                t.render(scope).map_err(|e| {
                    format!(
                        "truncate of {}: the label {t} depends on row data ({e}), so the elements to drop cannot be found",
                        change.relation
                    )
                })
            };
            let mut ops = Vec::new();
            for e in &self.edges {
                ops.push(GraphOp::DropLabel { vertices: false, label: label(&e.label)? });
            }
            for v in self.vertices.iter().filter(|v| v.drop_on_delete) {
                ops.push(GraphOp::DropLabel { vertices: true, label: label(&v.label)? });
            }
            if !ops.is_empty() {
                out.push(Payload::Graph(ops));
            }
            return Ok(());
        }
        let old = old_view(change);
        let old_scope = old.as_ref().map(|c| ChangeScope { change: c, event: None });
        let mut ops = Vec::new();
        for v in &self.vertices {
            if change.op == Op::Delete {
                if v.drop_on_delete {
                    let s: &dyn Scope = old_scope.as_ref().map(|s| s as &dyn Scope).unwrap_or(scope);
                    ops.push(GraphOp::DropVertex {
                        id: check_id("vertex", v.id.render(s).map_err(|e| e.to_string())?)?,
                    });
                }
                continue;
            }
            let id = check_id("vertex", v.id.render(scope).map_err(|e| e.to_string())?)?;
            if v.drop_on_delete && change.op == Op::Update {
                // The row's identity moved (key change): the old vertex goes.
                if let Some(Ok(old_id)) = old_scope.as_ref().map(|s| v.id.render(s))
                    && old_id != id
                {
                    ops.push(GraphOp::DropVertex { id: old_id });
                }
            }
            ops.push(GraphOp::Vertex {
                id,
                label: v.label.render(scope).map_err(|e| e.to_string())?,
                props: render_props(&v.props, scope)?,
            });
        }
        for e in &self.edges {
            if change.op == Op::Delete {
                let s: &dyn Scope = old_scope.as_ref().map(|s| s as &dyn Scope).unwrap_or(scope);
                let id = check_id("edge", e.id.render(s).map_err(|e| e.to_string())?)?;
                let from = e.from.id.render(s).ok();
                ops.push(GraphOp::DropEdge { id, from });
                continue;
            }
            let (id, from, to) = e.ends(scope)?;
            if change.op == Op::Update {
                match old_scope.as_ref().map(|s| e.ends(s)) {
                    Some(Ok((old_id, old_from, old_to))) if old_id != id || old_from != from || old_to != to => {
                        ops.push(GraphOp::DropEdge { id: old_id, from: Some(old_from.1) });
                    }
                    Some(Ok(_)) => {}
                    // No usable old image: the endpoints may have moved unless they are keys.
                    _ if !e.key_only => ops.push(GraphOp::DropEdge { id: id.clone(), from: None }),
                    _ => {}
                }
            }
            ops.push(GraphOp::Edge {
                id,
                label: e.label.render(scope).map_err(|e| e.to_string())?,
                from,
                to,
                props: render_props(&e.props, scope)?,
            });
        }
        if !ops.is_empty() {
            out.push(Payload::Graph(ops));
        }
        Ok(())
    }

    fn paths(&self) -> Vec<&Path> {
        fn props<'a>(specs: &'a [(String, PropSpec)], p: &mut Vec<&'a Path>) {
            for (_, s) in specs {
                match s {
                    PropSpec::Template(t) => p.extend(t.paths()),
                    PropSpec::Path(path) => p.push(path),
                }
            }
        }
        let mut p = Vec::new();
        for v in &self.vertices {
            p.extend(v.label.paths().chain(v.id.paths()));
            props(&v.props, &mut p);
        }
        for e in &self.edges {
            p.extend(e.label.paths().chain(e.id.paths()).chain(e.from.id.paths()).chain(e.to.id.paths()));
            props(&e.props, &mut p);
        }
        p
    }

    fn describe(&self) -> String {
        let v: Vec<String> = self.vertices.iter().map(|v| format!("vertex {} {}", v.label, v.id)).collect();
        let e: Vec<String> =
            self.edges.iter().map(|e| format!("edge ({})-[{} {}]->({})", e.from.id, e.label, e.id, e.to.id)).collect();
        [v, e].concat().join(", ")
    }
}
