//! Reading pipeline files: one TOML file per pipeline in the pipelines directory.
//!
//! ```toml
//! name   = "cart-cache"                 # default: the file name without .toml
//! source = "shop"                       # a [sources.<name>] of the config
//! [match]
//! relations = ["public.carts", "public.cart_items"]
//! ops       = ["insert", "update", "delete"]   # default: all
//! [[sink]]
//! target = "cache"                      # a [sinks.<name>] of the config
//! action = "invalidate"
//! keys   = ["cart:{{ row.user_id }}"]
//! ```
//!
//! Loading is pure and reports every problem with file:line:col.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::vrl::{Role, VrlProgram};
use super::{BoundAction, Pipeline};
use crate::change::matcher::{OpSet, RelationPattern};
use crate::change::non_finite::NonFinite;
use crate::change::{Name, Op};
use crate::config::ConfigError;
use crate::sink::SinkConfig;

/// What loading pipelines needs from the config: where the files are, which sources exist and
/// the sink targets their actions compile against.
pub struct PipelineEnv<'a> {
    /// The pipelines directory.
    pub dir: &'a Path,
    /// Source names.
    pub sources: BTreeSet<String>,
    /// Sink targets by name.
    pub sinks: &'a std::collections::BTreeMap<String, SinkConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    #[serde(default)]
    name: Option<Spanned<String>>,
    source: Spanned<String>,
    #[serde(rename = "match")]
    matches: Spanned<RawMatch>,
    #[serde(default)]
    filter: Option<Spanned<String>>,
    #[serde(default)]
    transform: Option<Spanned<String>>,
    #[serde(default)]
    snapshot: Option<Spanned<String>>,
    #[serde(default)]
    text_columns: Vec<Spanned<String>>,
    #[serde(default)]
    non_finite: Option<Spanned<String>>,
    #[serde(default, rename = "sink")]
    sinks: Vec<Spanned<toml::Table>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    relations: Vec<Spanned<String>>,
    #[serde(default)]
    ops: Option<Vec<Spanned<String>>>,
}

/// Every `*.toml` in `dir`, sorted, so load order (and error order) is stable.
pub fn pipeline_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let rd = std::fs::read_dir(dir).map_err(|source| ConfigError::Read { path: dir.to_owned(), source })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Load and compile every pipeline in the configured directory; all errors are collected.
pub fn load_all(cfg: &PipelineEnv<'_>) -> Result<Vec<Arc<Pipeline>>, ConfigError> {
    let files = pipeline_files(cfg.dir)?;
    let mut errors = Vec::new();
    let mut out: Vec<Arc<Pipeline>> = Vec::new();
    let mut names = BTreeSet::new();
    for f in files {
        match load_file(&f, cfg) {
            Ok(p) => {
                if !names.insert(p.name.to_string()) {
                    errors.push(ConfigError::Invalid {
                        what: f.display().to_string(),
                        msg: format!("pipeline name {:?} is used by another file", p.name),
                    });
                }
                out.push(Arc::new(p));
            }
            Err(e) => errors.push(e),
        }
    }
    ConfigError::collect(errors)?;
    Ok(out)
}

/// Load one pipeline file.
pub fn load_file(path: &Path, cfg: &PipelineEnv<'_>) -> Result<Pipeline, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    compile(path, &text, cfg)
}

/// Find where `needle` (a template or a target name) first appears at or after the start of a
/// table, for precise errors (a table's span may cover only its header).
fn locate(text: &str, span: std::ops::Range<usize>, needle: &str) -> usize {
    let start = text.floor_char_boundary(span.start.min(text.len()));
    text[start..].find(needle).map(|i| start + i).unwrap_or(start)
}

/// Where the program text of a TOML string starting at `offset` begins: after the opening
/// quote(s), and after the newline a multi-line string may start with. Offsets inside the
/// program then map to file positions exactly for literal strings (`'…'`, `\'\'\'…\'\'\'`).
fn program_start(text: &str, offset: usize) -> usize {
    let rest = &text[text.floor_char_boundary(offset.min(text.len()))..];
    let mut start = offset;
    if rest.starts_with("\'\'\'") || rest.starts_with("\"\"\"") {
        start += 3;
        let after = &rest[3..];
        if after.starts_with("\r\n") {
            start += 2;
        } else if after.starts_with('\n') {
            start += 1;
        }
    } else if rest.starts_with('\'') || rest.starts_with('"') {
        start += 1;
    }
    start
}

/// Compile pipeline text read from `path`.
pub fn compile(path: &Path, text: &str, cfg: &PipelineEnv<'_>) -> Result<Pipeline, ConfigError> {
    let raw: RawPipeline = toml::from_str(text).map_err(|e| {
        let mut err = ConfigError::from_toml(path, text, &e);
        if let ConfigError::At { msg, .. } = &mut err
            && msg.contains("expected `relations` or `ops`")
        {
            msg.push_str(" (keys after [match] belong to it: put name, source, filter and transform above [match])");
        }
        err
    })?;
    let at = |offset: usize, msg: String| ConfigError::at(path, text, offset, msg);
    let mut errors = Vec::new();

    let name = match &raw.name {
        Some(n) => n.get_ref().clone(),
        None => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        errors.push(at(
            raw.name.as_ref().map(|n| n.span().start).unwrap_or(0),
            format!("pipeline name {name:?} must be letters, digits, '_' or '-'"),
        ));
    }

    let source = raw.source.get_ref();
    if !cfg.sources.contains(source) {
        let known: Vec<&str> = cfg.sources.iter().map(String::as_str).collect();
        errors.push(at(raw.source.span().start, format!("unknown source {source:?}; the config defines {known:?}")));
    }

    let mut relations = Vec::new();
    if raw.matches.get_ref().relations.is_empty() {
        errors.push(at(raw.matches.span().start, "match.relations is empty; name at least one relation".into()));
    }
    for r in &raw.matches.get_ref().relations {
        match RelationPattern::parse(r.get_ref()) {
            Ok(p) => relations.push(p),
            Err(m) => errors.push(at(r.span().start, m)),
        }
    }
    let ops = match &raw.matches.get_ref().ops {
        None => OpSet::ALL,
        Some(list) => {
            let mut ops = Vec::new();
            for o in list {
                match Op::parse(o.get_ref()) {
                    Some(op) => ops.push(op),
                    None => errors.push(at(
                        o.span().start,
                        format!("unknown op {:?}; use insert, update, delete, truncate or read", o.get_ref()),
                    )),
                }
            }
            OpSet::from_ops(ops)
        }
    };

    let mut programs = [None, None];
    for (slot, (what, role, prog)) in
        [("filter", Role::Filter, &raw.filter), ("transform", Role::Transform, &raw.transform)].into_iter().enumerate()
    {
        let Some(p) = prog else { continue };
        match VrlProgram::compile(p.get_ref(), role) {
            Ok(program) => programs[slot] = Some(Arc::new(program)),
            Err(errs) => {
                let base = program_start(text, p.span().start);
                for e in errs {
                    errors.push(at(base + e.offset, format!("{what}: {}", e.message)));
                }
            }
        }
    }
    let [filter, transform] = programs;

    let snapshot_initial = match raw.snapshot.as_ref().map(|s| (s.get_ref().as_str(), s.span().start)) {
        None | Some(("never", _)) => false,
        Some(("initial", _)) => {
            if !ops.contains(Op::Read) {
                errors.push(at(0, "snapshot = \"initial\" needs the read op in match.ops".into()));
            }
            true
        }
        Some((other, offset)) => {
            errors.push(at(offset, format!("snapshot = {other:?}; use \"initial\" or \"never\"")));
            false
        }
    };

    let mut text_columns: Vec<Name> = Vec::new();
    for c in &raw.text_columns {
        let column = c.get_ref();
        if column.is_empty() {
            errors.push(at(c.span().start, "text_columns: a column name cannot be empty".into()));
        } else if text_columns.iter().any(|t| &**t == column) {
            errors.push(at(c.span().start, format!("text_columns lists {column:?} twice")));
        } else {
            text_columns.push(Name::from(column.as_str()));
        }
    }

    let non_finite = match &raw.non_finite {
        None => NonFinite::default(),
        Some(w) => NonFinite::parse(w.get_ref()).unwrap_or_else(|| {
            errors.push(at(
                w.span().start,
                format!("non_finite = {:?}; use \"string\", \"null\" or \"reject\"", w.get_ref()),
            ));
            NonFinite::default()
        }),
    };

    if raw.sinks.is_empty() {
        errors.push(at(0, "pipeline has no [[sink]]; add at least one".into()));
    }
    let mut actions = Vec::new();
    for (i, s) in raw.sinks.iter().enumerate() {
        let span = s.span();
        let table = s.get_ref().clone();
        let Some(target) = table.get("target").and_then(|t| t.as_str()).map(str::to_string) else {
            errors.push(at(span.start, format!("sink #{}: target = \"<sink name>\" is required", i + 1)));
            continue;
        };
        let Some(sink_cfg) = cfg.sinks.get(&target) else {
            let known: Vec<&str> = cfg.sinks.keys().map(String::as_str).collect();
            errors.push(at(
                locate(text, span.clone(), &format!("\"{target}\"")),
                format!("sink #{}: unknown sink target {target:?}; the config defines {known:?}", i + 1),
            ));
            continue;
        };
        match sink_cfg.compile_action(&target, table.clone()) {
            Ok(action) => actions.push(BoundAction {
                target: Name::from(target.as_str()),
                kind: sink_cfg.kind(),
                action,
                outputs: crate::telemetry::metrics().pipeline_outputs.with_label_values(&[&name, &target]),
            }),
            Err(msg) => {
                // Point at the key the message names (`` `key`: … ``), else at the offending
                // template when the message quotes one.
                let key = msg.strip_prefix('`').and_then(|m| m.split_once('`')).map(|(k, _)| k);
                let offset = match key.and_then(|k| {
                    let body = crate::config::table_body(text, span.clone());
                    crate::config::key_offset(text, body, k.rsplit('.').next().unwrap_or(k))
                }) {
                    Some(at) => at,
                    None => {
                        msg.split('"').nth(1).map(|needle| locate(text, span.clone(), needle)).unwrap_or(span.start)
                    }
                };
                errors.push(at(offset, format!("sink #{} ({target}): {msg}", i + 1)));
            }
        }
    }
    ConfigError::collect(errors)?;
    Ok(Pipeline {
        filter,
        transform,
        name: Name::from(name.as_str()),
        file: path.to_owned(),
        source: Name::from(source.as_str()),
        relations,
        ops,
        actions,
        snapshot_initial,
        text_columns,
        non_finite,
        fingerprint: {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            text.hash(&mut h);
            h.finish()
        },
    })
}
