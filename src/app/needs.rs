//! What each source must provide for the pipeline set: tables, columns, images, snapshots.

use std::sync::Arc;

use crate::change::template::Root;
use crate::pipeline::Pipeline;
use crate::source::SourceNeeds;

/// What the pipelines reading `source` need from it.
pub fn source_needs(pipelines: &[Arc<Pipeline>], source: &str) -> SourceNeeds {
    let mut needs = SourceNeeds::default();
    for p in pipelines.iter().filter(|p| &*p.source == source) {
        let text = std::fs::read_to_string(&p.file).unwrap_or_default();
        let at = |name: &str| column_site(p, &text, name);
        needs.snapshots.push((Arc::clone(&p.name), p.relations.clone(), p.snapshot_initial));
        for rel in p.exact_relations() {
            needs.tables.insert(rel.to_string());
            needs.table_sites.entry(rel.to_string()).or_insert_with(|| at(rel));
            let cols = needs.columns.entry(rel.to_string()).or_default();
            for col in &p.text_columns {
                cols.push((at(col), col.to_string()));
            }
            if p.transform.is_some() {
                continue; // templates read the transformed event, not table columns
            }
            for a in &p.actions {
                for path in a.action.paths() {
                    if path.root == Root::Event {
                        continue;
                    }
                    if let Some(col) = path.column() {
                        cols.push((at(col), col.to_string()));
                    }
                }
                for col in a.action.columns() {
                    cols.push((at(col), col.to_string()));
                }
            }
        }
        if p.transform.is_none() {
            for a in &p.actions {
                for path in a.action.paths() {
                    match path.root {
                        Root::After | Root::Row => needs.images.new = true,
                        Root::Before => needs.images.old = true,
                        _ => {}
                    }
                }
            }
        }
    }
    needs.columns.retain(|_, v| !v.is_empty());
    needs
}

/// "orders-cache (pipelines/orders.toml:12:19)": the pipeline and where its file names `name`
/// (a column or a table), so one the database lacks is reported at the line to fix.
fn column_site(p: &Pipeline, text: &str, name: &str) -> String {
    match crate::config::word_offset(text, name) {
        Some(at) => {
            let (line, col) = crate::config::line_col(text, at);
            format!("{} ({}:{line}:{col})", p.name, p.file.display())
        }
        None => format!("{} ({})", p.name, p.file.display()),
    }
}
