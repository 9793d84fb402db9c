//! What templates see: a change (and, after a transform, the transformed event).

use std::borrow::Cow;

use super::template::{Path, Root, Scope, Step, walk};
use crate::change::{Change, Value};

/// A change as template input; `event` is the transform's output when there is one.
pub struct ChangeScope<'a> {
    /// The change.
    pub change: &'a Change,
    /// The transformed event, if a transform ran.
    pub event: Option<&'a Value>,
}

impl Scope for ChangeScope<'_> {
    fn resolve(&self, path: &Path) -> Option<Cow<'_, Value>> {
        let c = self.change;
        let row = match path.root {
            Root::Key => Some(&c.key),
            Root::Before => c.before.as_ref(),
            Root::After => c.after.as_ref(),
            Root::Row => c.row(),
            Root::Event => {
                return walk(Cow::Borrowed(self.event?), &path.steps);
            }
            Root::Relation => return Some(Cow::Owned(Value::Text(c.relation.to_string()))),
            Root::Schema => {
                return Some(Cow::Owned(Value::Text(
                    c.relation.rsplit_once('.').map(|(s, _)| s).unwrap_or("").to_string(),
                )));
            }
            Root::Table => {
                return Some(Cow::Owned(Value::Text(
                    c.relation.rsplit_once('.').map(|(_, t)| t).unwrap_or(&c.relation).to_string(),
                )));
            }
            Root::Op => return Some(Cow::Owned(Value::Text(c.op.as_str().to_string()))),
            Root::Source => return Some(Cow::Owned(Value::Text(c.source.to_string()))),
            Root::Version => return Some(Cow::Owned(Value::Decimal(c.version.to_string()))),
        }?;
        let Some(Step::Field(first)) = path.steps.first() else {
            return None;
        };
        let v = row.get(first)?;
        walk(Cow::Borrowed(v), &path.steps[1..])
    }

    fn unchanged(&self, path: &Path) -> bool {
        let c = self.change;
        let reads_new_row = match path.root {
            Root::After => true,
            Root::Row => c.after.is_some(),
            _ => false,
        };
        reads_new_row && matches!(path.steps.first(), Some(Step::Field(f)) if c.is_unchanged(f))
    }
}
