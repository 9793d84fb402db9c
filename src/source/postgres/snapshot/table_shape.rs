//! A table's columns and keys as the chunk query reads them, and the text helpers of the
//! simple-query protocol it uses.

use std::sync::Arc;

use crate::change::Name;
use crate::source::postgres::setup::{self, Catalog, quote_relation};
use crate::source::postgres::types::ColumnType;

pub(super) struct TableShape {
    /// Name, how its text is decoded, SQL type for casts.
    pub(super) columns: Vec<(Name, ColumnType, String)>,
    /// Key columns in the key index's order: what chunks are paged by.
    pub(super) page_key: Vec<usize>,
    /// Key columns in the table's column order: how key rows are built, as the stream does.
    pub(super) key: Vec<usize>,
}

pub(super) async fn shape(
    client: &tokio_postgres::Client,
    catalog: &Catalog,
    relation: &str,
) -> Result<TableShape, String> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::oid, format_type(a.atttypid, a.atttypmod), t.typname::text, n.nspname::text \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace n ON n.oid = t.typnamespace \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
               AND (a.attgenerated = '' OR (a.attgenerated = 's' AND $2)) \
             ORDER BY a.attnum",
            &[&quote_relation(relation), &catalog.publishes_generated],
        )
        .await
        .map_err(|e| setup::pg_error_text(&e))?;
    let columns: Vec<(Name, ColumnType, String)> =
        rows.iter()
            .map(|r| {
                let (name, oid, sql_type, typname, ns): (String, u32, String, String, String) =
                    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
                let type_name: Arc<str> =
                    catalog.types.name(oid).map(Arc::from).unwrap_or_else(|| {
                        Arc::from(crate::source::postgres::types::qualified_type_name(&ns, &typname))
                    });
                (Name::from(name), catalog.types.column(oid, type_name), sql_type)
            })
            .collect();
    let key_names = catalog.key_columns.get(relation).ok_or_else(|| {
        format!(
            "table {relation} has no primary key or replica identity index: snapshots read in key order, chunk by chunk; add a primary key"
        )
    })?;
    let page_key = key_names
        .iter()
        .map(|k| columns.iter().position(|c| &*c.0 == k).ok_or_else(|| format!("{relation}: key column {k} not found")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut key = page_key.clone();
    key.sort_unstable();
    Ok(TableShape { columns, page_key, key })
}

/// A SQL literal of `text` cast to `sql_type`, for the simple-query protocol (which has no
/// parameters, but answers in the types' own text output, exactly as pgoutput sends values).
pub(super) fn literal(text: &str, sql_type: &str) -> String {
    format!("E'{}'::{sql_type}", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The rows of a simple query, each column as the server's text output (`None` for NULL).
pub(super) async fn text_rows(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for m in client.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            out.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
        }
    }
    Ok(out)
}

pub(super) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
