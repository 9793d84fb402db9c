//! Pipelines: what each change matches, how it is reshaped, and which sink actions it feeds.
//!
//! A pipeline is pure: [`process::apply`] turns a change into sink payloads (or dead letters).
//! The runtime's lanes run pipelines and hand the payloads to the sinks' queues.

pub mod load;
pub mod process;
pub mod text_columns;
pub mod vrl;

use std::path::PathBuf;
use std::sync::Arc;

use crate::change::matcher::{OpSet, RelationPattern};

use crate::change::Name;
use crate::sink::Action;

/// A compiled pipeline (no connections; `check` builds these too).
pub struct Pipeline {
    /// Unique name.
    pub name: Name,
    /// File it was loaded from.
    pub file: PathBuf,
    /// Source it reads.
    pub source: Name,
    /// Relations it matches.
    pub relations: Vec<RelationPattern>,
    /// Operations it matches.
    pub ops: OpSet,
    /// Sink actions, in file order.
    pub actions: Vec<BoundAction>,
    /// VRL filter (true keeps the change).
    pub filter: Option<Arc<vrl::VrlProgram>>,
    /// VRL transform (reshapes the change; may emit several outputs).
    pub transform: Option<Arc<vrl::VrlProgram>>,
    /// `snapshot = "initial"`: the first start reads every existing row of its tables.
    pub snapshot_initial: bool,
    /// Binary columns that hold UTF-8 text: decoded (strictly) before the filter runs.
    pub text_columns: Vec<Name>,
    /// What the sinks receive for NaN, ±Infinity and infinite dates.
    pub non_finite: crate::change::non_finite::NonFinite,
    /// Hash of the file's text: a reload names the pipelines whose definition changed.
    pub fingerprint: u64,
}

/// A sink action bound to its target name.
pub struct BoundAction {
    /// Sink target name.
    pub target: Name,
    /// Sink kind word.
    pub kind: &'static str,
    /// Compiled action.
    pub action: Arc<dyn Action>,
    /// Records produced, for `polysync_pipeline_outputs_total`.
    pub outputs: prometheus::IntCounter,
}

impl Pipeline {
    /// Does this pipeline take changes of `relation`?
    pub fn matches_relation(&self, relation: &str) -> bool {
        self.relations.iter().any(|p| p.matches(relation))
    }

    /// Does this pipeline take a change of this operation? A key change arrives as a delete and
    /// an insert (see [`crate::change::Change::split_key_change`]); a pipeline matching
    /// `update` takes both halves, since for it the change is an update.
    pub fn takes_op(&self, change: &crate::change::Change) -> bool {
        self.ops.contains(change.op) || (change.key_changed && self.ops.contains(crate::change::Op::Update))
    }

    /// Exact relation names it lists (for publication set-up).
    pub fn exact_relations(&self) -> impl Iterator<Item = &str> {
        self.relations.iter().filter_map(|r| match r {
            RelationPattern::Exact(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// Human-readable plan lines for `polysync check`.
    pub fn describe(&self) -> Vec<String> {
        let rels: Vec<String> = self
            .relations
            .iter()
            .map(|r| match r {
                RelationPattern::Exact(s) => s.clone(),
                RelationPattern::Prefix(p) => format!("{p}*"),
                RelationPattern::All => "*".into(),
            })
            .collect();
        let mut lines = vec![format!(
            "pipeline {} ({}): source {} relations [{}] ops [{}]{}{}",
            self.name,
            self.file.display(),
            self.source,
            rels.join(", "),
            self.ops.names().join(", "),
            if self.filter.is_some() { ", filtered (VRL)" } else { "" },
            if self.transform.is_some() { ", transformed (VRL)" } else { "" },
        )];
        if !self.text_columns.is_empty() {
            let cols: Vec<&str> = self.text_columns.iter().map(|c| &**c).collect();
            lines.push(format!("  text columns (binary decoded as UTF-8): [{}]", cols.join(", ")));
        }
        if self.non_finite != crate::change::non_finite::NonFinite::default() {
            lines.push(format!("  non-finite values (NaN, Infinity, infinite dates): {}", self.non_finite.word()));
        }
        for a in &self.actions {
            lines.push(format!("  -> sink {} ({}): {}", a.target, a.kind, a.action.describe()));
        }
        lines
    }
}
