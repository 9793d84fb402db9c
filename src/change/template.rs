//! Templates for keys, document ids, index names, labels: `"cart:{{ after.user_id }}"`.
//!
//! One implementation for every sink. A template is parsed once when its pipeline is loaded
//! (syntax and root names are checked there, so `polysync check` catches them) and rendered per
//! change without re-parsing. A path that names a field the change does not have, or a value
//! with no single-line text form (NULL, a list), is a [`RenderError`], which sends the change to
//! the dead-letter queue; it never renders as an empty string or `null` into a key.
//!
//! Paths: a root, then `.field` steps (also into JSON columns and maps) or `[n]` list indexes.
//! Roots: `key`, `before`, `after`, `row` (after, or before for deletes), `event` (the output of
//! a transform), and the scalars `relation`, `schema`, `table`, `op`, `source`, `version`.

use std::borrow::Cow;
use std::fmt;

use crate::change::Value;

/// Where a path starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// Primary-key columns.
    Key,
    /// Old row.
    Before,
    /// New row.
    After,
    /// New row, or the old one when there is no new one.
    Row,
    /// The transformed event (VRL output).
    Event,
    /// `schema.table`.
    Relation,
    /// Schema part of the relation.
    Schema,
    /// Table part of the relation.
    Table,
    /// `insert`, `update`, ...
    Op,
    /// Source name.
    Source,
    /// The change's version.
    Version,
}

impl Root {
    fn parse(s: &str) -> Option<Root> {
        Some(match s {
            "key" => Root::Key,
            "before" => Root::Before,
            "after" => Root::After,
            "row" => Root::Row,
            "event" => Root::Event,
            "relation" => Root::Relation,
            "schema" => Root::Schema,
            "table" => Root::Table,
            "op" => Root::Op,
            "source" => Root::Source,
            "version" => Root::Version,
            _ => return None,
        })
    }

    /// True for roots that hold fields (and so need a field name after them).
    pub fn has_fields(self) -> bool {
        matches!(self, Root::Key | Root::Before | Root::After | Root::Row | Root::Event)
    }
}

/// One step after the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `.name`
    Field(String),
    /// `[n]`
    Index(usize),
}

/// A parsed `{{ … }}` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// Where it starts.
    pub root: Root,
    /// Steps after the root.
    pub steps: Vec<Step>,
    text: String,
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Path {
    /// Parse `after.payload.items[0].sku`.
    pub fn parse(s: &str) -> Result<Path, String> {
        let text = s.trim();
        let mut rest = text;
        let root_end = rest.find(['.', '[']).unwrap_or(rest.len());
        let root_word = &rest[..root_end];
        let root = Root::parse(root_word).ok_or_else(|| {
            format!(
                "unknown template root {root_word:?} in {{{{ {text} }}}}; use key, before, after, row, event, relation, schema, table, op, source or version"
            )
        })?;
        rest = &rest[root_end..];
        let mut steps = Vec::new();
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix('.') {
                let end = r.find(['.', '[']).unwrap_or(r.len());
                let name = &r[..end];
                if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '$') {
                    return Err(format!("bad field name {name:?} in {{{{ {text} }}}}"));
                }
                steps.push(Step::Field(name.to_string()));
                rest = &r[end..];
            } else if let Some(r) = rest.strip_prefix('[') {
                let end = r.find(']').ok_or_else(|| format!("missing ] in {{{{ {text} }}}}"))?;
                let n =
                    r[..end].trim().parse().map_err(|_| format!("bad index [{}] in {{{{ {text} }}}}", &r[..end]))?;
                steps.push(Step::Index(n));
                rest = &r[end + 1..];
            } else {
                return Err(format!("unexpected {rest:?} in {{{{ {text} }}}}"));
            }
        }
        if root.has_fields() && steps.is_empty() && root != Root::Event {
            return Err(format!("{{{{ {text} }}}} names a whole row; name a field, e.g. {{{{ {text}.id }}}}"));
        }
        if !root.has_fields() && !steps.is_empty() {
            return Err(format!("{{{{ {text} }}}}: {root_word} has no fields"));
        }
        Ok(Path { root, steps, text: text.to_string() })
    }

    /// The first field after a row root (`after.user_id` → `user_id`), for checking column names.
    pub fn column(&self) -> Option<&str> {
        match (self.root, self.steps.first()) {
            (Root::Key | Root::Before | Root::After | Root::Row, Some(Step::Field(f))) => Some(f),
            _ => None,
        }
    }
}

/// Why a template could not be rendered for a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The path names something the change does not have.
    #[error("template field {path} is missing")]
    Missing {
        /// The path as written.
        path: String,
    },
    /// The path names a column the source did not send (an unchanged TOAST value).
    #[error(
        "template field {path} was not sent by the source (an unchanged TOAST value, which PostgreSQL omits unless the table has REPLICA IDENTITY FULL); a key, id or name cannot be built from it"
    )]
    Unchanged {
        /// The path as written.
        path: String,
    },
    /// The value exists but has no text form.
    #[error("template field {path} is {kind}, which cannot be part of a key or name")]
    NotText {
        /// The path as written.
        path: String,
        /// Value kind (`null`, `list`, …).
        kind: &'static str,
    },
    /// Rendered text exceeded the limit for its use.
    #[error("rendered value is {len} bytes, over the {limit}-byte limit")]
    TooLong {
        /// Actual length.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

/// Something paths resolve against: a change, or a transformed event.
pub trait Scope {
    /// The value at `path`, or `None` if there is none.
    fn resolve(&self, path: &Path) -> Option<Cow<'_, Value>>;

    /// True when `path` reads a column the source did not send (TOAST-unchanged): its value is
    /// unknown, not missing, and each sink treats it as "keep what is stored".
    fn unchanged(&self, _path: &Path) -> bool {
        false
    }
}

/// Walk steps below a value (into maps, lists and JSON text).
pub fn walk<'a>(mut v: Cow<'a, Value>, steps: &[Step]) -> Option<Cow<'a, Value>> {
    for (i, step) in steps.iter().enumerate() {
        if let Value::Json(text) = &*v {
            let json: serde_json::Value = serde_json::from_str(text).ok()?;
            let mut cur = &json;
            for s in &steps[i..] {
                cur = match s {
                    Step::Field(f) => cur.get(f)?,
                    Step::Index(n) => cur.get(*n)?,
                };
            }
            return Some(Cow::Owned(json_to_value(cur)));
        }
        v = match (v, step) {
            (Cow::Borrowed(Value::Map(m)), Step::Field(f)) => {
                Cow::Borrowed(m.iter().find(|(k, _)| k == f).map(|(_, v)| v)?)
            }
            (Cow::Owned(Value::Map(m)), Step::Field(f)) => {
                Cow::Owned(m.into_iter().find(|(k, _)| k == f).map(|(_, v)| v)?)
            }
            (Cow::Borrowed(Value::List(l)), Step::Index(n)) => Cow::Borrowed(l.get(*n)?),
            (Cow::Owned(Value::List(mut l)), Step::Index(n)) => {
                if *n >= l.len() {
                    return None;
                }
                Cow::Owned(l.swap_remove(*n))
            }
            _ => return None,
        };
    }
    Some(v)
}

fn json_to_value(j: &serde_json::Value) -> Value {
    match j {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Decimal(n.to_string()),
        },
        serde_json::Value::String(s) => Value::Text(s.clone()),
        other => Value::Json(other.to_string()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Field(Path),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    source: String,
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A template syntax error at a byte offset inside the template text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// Byte offset in the template.
    pub offset: usize,
    /// What is wrong.
    pub msg: String,
}

impl Template {
    /// Parse template text.
    pub fn parse(s: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = s;
        let mut offset = 0;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close =
                after.find("}}").ok_or_else(|| TemplateError { offset: offset + open, msg: "unclosed {{".into() })?;
            let path = Path::parse(&after[..close]).map_err(|msg| TemplateError { offset: offset + open, msg })?;
            parts.push(Part::Field(path));
            let consumed = open + 2 + close + 2;
            rest = &rest[consumed..];
            offset += consumed;
        }
        if rest.contains("}}") {
            return Err(TemplateError { offset: offset + rest.find("}}").unwrap_or(0), msg: "}} without {{".into() });
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        if parts.is_empty() {
            return Err(TemplateError { offset: 0, msg: "empty template".into() });
        }
        Ok(Template { parts, source: s.to_string() })
    }

    /// The paths the template reads.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f),
            Part::Lit(_) => None,
        })
    }

    /// True if the template is plain text.
    pub fn is_constant(&self) -> bool {
        self.paths().next().is_none()
    }

    /// Render into `out` (appending).
    pub fn render_into(&self, scope: &dyn Scope, out: &mut String) -> Result<(), RenderError> {
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Field(path) => {
                    let v = scope.resolve(path).ok_or_else(|| {
                        if scope.unchanged(path) {
                            RenderError::Unchanged { path: path.to_string() }
                        } else {
                            RenderError::Missing { path: path.to_string() }
                        }
                    })?;
                    let text = v
                        .template_text()
                        .ok_or_else(|| RenderError::NotText { path: path.to_string(), kind: v.type_word() })?;
                    out.push_str(&text);
                }
            }
        }
        Ok(())
    }

    /// Render to a new string.
    pub fn render(&self, scope: &dyn Scope) -> Result<String, RenderError> {
        let mut s = String::with_capacity(self.source.len() + 16);
        self.render_into(scope, &mut s)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct S;
    impl Scope for S {
        fn resolve(&self, p: &Path) -> Option<Cow<'_, Value>> {
            let v = match (p.root, p.steps.first()) {
                (Root::After, Some(Step::Field(f))) if f == "user_id" => Value::Int(7),
                (Root::After, Some(Step::Field(f))) if f == "doc" => Value::Json(r#"{"a":{"b":[10,"x"]}}"#.into()),
                (Root::After, Some(Step::Field(f))) if f == "gone" => Value::Null,
                (Root::Table, None) => Value::Text("carts".into()),
                _ => return None,
            };
            walk(Cow::Owned(v), &p.steps[1.min(p.steps.len())..])
        }
    }

    #[test]
    fn renders_fields_and_literals() {
        let t = Template::parse("cart:{{ after.user_id }}:{{table}}").unwrap();
        assert_eq!(t.render(&S).unwrap(), "cart:7:carts");
        let t = Template::parse("{{ after.doc.a.b[1] }}-{{ after.doc.a.b[0] }}").unwrap();
        assert_eq!(t.render(&S).unwrap(), "x-10");
    }

    #[test]
    fn missing_and_null_are_errors_not_text() {
        let t = Template::parse("k:{{ after.nope }}").unwrap();
        assert_eq!(t.render(&S), Err(RenderError::Missing { path: "after.nope".into() }));
        let t = Template::parse("k:{{ after.gone }}").unwrap();
        assert!(matches!(t.render(&S), Err(RenderError::NotText { kind: "null", .. })));
    }

    #[test]
    fn syntax_errors_have_offsets() {
        assert_eq!(Template::parse("ab{{ bogus.x }}").unwrap_err().offset, 2);
        assert!(Template::parse("ab{{ after.x").unwrap_err().msg.contains("unclosed"));
        assert!(Template::parse("{{ after }}").unwrap_err().msg.contains("whole row"));
        assert!(Template::parse("{{ op.x }}").unwrap_err().msg.contains("no fields"));
        assert!(Template::parse("x }}").is_err());
    }
}
