//! What start-up learns about the published tables: which are published, their keys (and
//! that every one has a key), columns, shapes and the types of the whole database.

use std::collections::{BTreeSet, HashMap};

use super::Checks;
use crate::source::SourceError;

/// What start-up learned about the published tables.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    /// Every type's name, domain base and array element: how columns are decoded.
    pub types: crate::source::postgres::types::Types,
    /// `schema.table` → primary-key columns (used as the key of REPLICA IDENTITY FULL tables).
    pub primary_keys: HashMap<String, Vec<String>>,
    /// `schema.table` → the columns of its key as the stream sees it (the replica identity: the
    /// primary key, or the index of `REPLICA IDENTITY USING INDEX`), in the index's column
    /// order, which snapshots page by. Keys themselves are built in the table's column order.
    pub key_columns: HashMap<String, Vec<String>>,
    /// `schema.table` → columns.
    pub columns: HashMap<String, Vec<String>>,
    /// `schema.table` → `(column, type OID)` as the stream describes the table at start.
    pub shapes: HashMap<String, Vec<(String, u32)>>,
    /// Published tables.
    pub published: BTreeSet<String>,
    /// `server_version_num` (pgoutput's `messages` option, which snapshots need, is 14+).
    pub server_version: u32,
    /// The signal table, when it exists and is published.
    pub signal_table: Option<String>,
    /// The publication publishes stored generated columns (PostgreSQL 18+
    /// `publish_generated_columns = stored`), so snapshots read them too.
    pub publishes_generated: bool,
}

/// Read the published tables' keys, columns and shapes and every type; refuse a published
/// table whose updates and deletes would carry no key.
///
/// In a dry run the tables a start would add to the publication (`wanted`) are checked as if
/// they were published already.
pub(super) async fn read(
    c: &Checks<'_>,
    publication: &str,
    wanted: &BTreeSet<String>,
    catalog: &mut Catalog,
) -> Result<(), SourceError> {
    catalog.published = c
        .client
        .query("SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1", &[&publication])
        .await
        .map_err(|e| c.sql(e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if c.dry_run {
        catalog.published.extend(wanted.iter().cloned());
    }

    // Replica identity: updates and deletes of a table with neither a primary key nor
    // REPLICA IDENTITY FULL/INDEX carry no key, so they could not be routed or applied.
    let rows = c
        .client
        .query(
            "SELECT n.nspname || '.' || c.relname, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE (n.nspname || '.' || c.relname) = ANY($1)",
            &[&catalog.published.iter().cloned().collect::<Vec<_>>()],
        )
        .await
        .map_err(|e| c.sql(e))?;
    let mut keyless = Vec::new();
    let mut identity_index = BTreeSet::new();
    for r in &rows {
        let table: String = r.get(0);
        let ident: String = r.get(1);
        let has_pk: bool = r.get(2);
        let has_ident_index: bool = r.get(3);
        match ident.as_str() {
            "d" if has_pk => {}
            "i" if has_ident_index => {
                identity_index.insert(table);
            }
            "f" => {}
            _ => keyless.push(table),
        }
    }
    if !keyless.is_empty() {
        keyless.sort();
        return Err(c.refuse(format!(
            "published tables without a primary key or replica identity index: {} (their updates and deletes carry no key; add a primary key, or a unique index on NOT NULL columns and ALTER TABLE … REPLICA IDENTITY USING INDEX …)",
            keyless.iter().map(|t| c.named(t)).collect::<Vec<_>>().join(", ")
        )));
    }

    catalog.primary_keys = index_columns(c, Index::Primary, &catalog.published).await?;
    let mut identity_keys = index_columns(c, Index::ReplicaIdentity, &identity_index).await?;
    for t in &catalog.published {
        let key = identity_keys.remove(t).or_else(|| catalog.primary_keys.get(t).cloned());
        if let Some(k) = key {
            catalog.key_columns.insert(t.clone(), k);
        }
    }
    for r in c.client
        .query(
            "SELECT n.nspname || '.' || c.relname, a.attname FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE a.attnum > 0 AND NOT a.attisdropped AND (n.nspname || '.' || c.relname) = ANY($1) ORDER BY 1, a.attnum",
            &[&catalog.published.iter().cloned().collect::<Vec<_>>()],
        )
        .await
        .map_err(|e| c.sql(e))?
    {
        catalog.columns.entry(r.get(0)).or_default().push(r.get(1));
    }
    // Each table's shape as pgoutput describes it (generated columns only when published), the
    // baseline column changes are judged against.
    for r in c
        .client
        .query(
            "SELECT n.nspname || '.' || c.relname, a.attname::text, a.atttypid FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE a.attnum > 0 AND NOT a.attisdropped AND (a.attgenerated = '' OR (a.attgenerated = 's' AND $2)) \
               AND (n.nspname || '.' || c.relname) = ANY($1) ORDER BY 1, a.attnum",
            &[&catalog.published.iter().cloned().collect::<Vec<_>>(), &catalog.publishes_generated],
        )
        .await
        .map_err(|e| c.sql(e))?
    {
        catalog.shapes.entry(r.get(0)).or_default().push((r.get(1), r.get(2)));
    }
    for r in c
        .client
        .query(
            "SELECT t.oid, t.typname::text, n.nspname::text, t.typbasetype, \
                    CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0::oid END \
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace",
            &[],
        )
        .await
        .map_err(|e| c.sql(e))?
    {
        let (oid, name, namespace, base, element): (u32, String, String, u32, u32) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        catalog.types.insert(
            oid,
            crate::source::postgres::types::qualified_type_name(&namespace, &name),
            base,
            element,
        );
    }

    Ok(())
}

/// Which index of a table names its key columns.
#[derive(Clone, Copy)]
enum Index {
    Primary,
    ReplicaIdentity,
}

/// `schema.table` → the columns of its primary key or replica identity index, in index order.
async fn index_columns(
    c: &Checks<'_>,
    index: Index,
    tables: &BTreeSet<String>,
) -> Result<HashMap<String, Vec<String>>, SourceError> {
    let flag = match index {
        Index::Primary => "i.indisprimary",
        Index::ReplicaIdentity => "i.indisreplident",
    };
    let sql = format!(
        "SELECT n.nspname || '.' || c.relname, a.attname \
         FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
         WHERE {flag} AND (n.nspname || '.' || c.relname) = ANY($1) ORDER BY 1, k.ord"
    );
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for r in c.client.query(&sql, &[&tables.iter().cloned().collect::<Vec<_>>()]).await.map_err(|e| c.sql(e))? {
        out.entry(r.get(0)).or_default().push(r.get(1));
    }
    Ok(out)
}
