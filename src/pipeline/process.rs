//! One pipeline applied to one change: filter, transform, then every sink action's rendering.
//! Pure (no I/O), shared by the lanes and by `polysync dlq replay`, so a replayed dead letter
//! goes through exactly what live changes go through.

use super::Pipeline;
use super::vrl::Outcome;
use crate::change::Change;
use crate::change::scope::ChangeScope;
use crate::sink::Payload;
use crate::telemetry::metrics;

/// What processing produced, in order.
pub enum Step {
    /// A payload for the action at this index (`Pipeline::actions`).
    Payload {
        /// Action index.
        action: usize,
        /// What to write.
        payload: Payload,
    },
    /// The change cannot be delivered to `sink` (`-` when it failed before any sink).
    DeadLetter {
        /// Sink target name or `-`.
        sink: String,
        /// Why, naming the pipeline and its file.
        reason: String,
    },
}

fn skipped(pipeline: &str, reason: &str) {
    metrics().pipeline_skipped.with_label_values(&[pipeline, reason]).inc();
}

/// Apply `def` to `change`, appending steps to `out`. `only` restricts the actions to one sink
/// target (replaying a dead letter for that sink). The caller checks relation and op matching.
pub fn apply(def: &Pipeline, change: &Change, only: Option<&str>, out: &mut Vec<Step>) {
    let fail = |what: &str, e: String| Step::DeadLetter {
        sink: "-".into(),
        reason: format!("{} ({}): {what} failed: {e}", def.name, def.file.display()),
    };
    let decoded;
    let change = match super::text_columns::decode(change, &def.text_columns) {
        Ok(None) => change,
        Ok(Some(c)) => {
            decoded = c;
            &decoded
        }
        Err(e) => return out.push(fail("text_columns", e)),
    };
    let finite;
    let change = match crate::change::non_finite::apply(change, def.non_finite) {
        None => change,
        Some(c) => {
            finite = c;
            &finite
        }
    };
    if let Some(filter) = &def.filter {
        match filter.test(change) {
            Outcome::Ok(true) => {}
            Outcome::Ok(false) => return skipped(&def.name, "filtered"),
            Outcome::Aborted => return skipped(&def.name, "aborted"),
            Outcome::Failed(e) => return out.push(fail("filter", e)),
        }
    }
    let transformed = match &def.transform {
        None => None,
        Some(t) => match t.transform(change) {
            Outcome::Ok(events) => Some(events),
            Outcome::Aborted => return skipped(&def.name, "aborted"),
            Outcome::Failed(e) => return out.push(fail("transform", e)),
        },
    };
    let mut render = |view: &Change, event: Option<&crate::change::Value>| {
        let scope = ChangeScope { change: view, event };
        for (i, bound) in def.actions.iter().enumerate() {
            if only.is_some_and(|o| o != &*bound.target) {
                continue;
            }
            let mut payloads = Vec::new();
            match bound.action.render(&scope, view, &mut payloads) {
                Ok(()) => {
                    bound.outputs.inc_by(payloads.len() as u64);
                    out.extend(payloads.into_iter().map(|payload| Step::Payload { action: i, payload }));
                }
                Err(reason) => out.push(Step::DeadLetter {
                    sink: bound.target.to_string(),
                    reason: format!("{} ({}): {reason}", def.name, def.file.display()),
                }),
            }
        }
    };
    match &transformed {
        None => render(change, None),
        Some(events) => {
            for (derived, event) in events {
                render(derived, Some(event));
            }
        }
    }
}
