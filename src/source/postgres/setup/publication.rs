//! The publication and what it must contain: the signal table, the tables pipelines name,
//! partitioned tables published under the parent's name, stored generated columns on 18+.

use std::collections::BTreeSet;

use super::{Checks, quote_ident, quote_relation};
use crate::source::SourceError;
use crate::source::postgres::config::{ConnInfo, PostgresSourceConfig};

/// The options of a publication polysync creates: partitioned tables publish under the
/// parent's name (13+), and stored generated columns are part of the row (18+).
pub fn publication_options(server_version: u32) -> String {
    let mut options = vec!["publish_via_partition_root = true"];
    if server_version >= 180_000 {
        options.push("publish_generated_columns = stored");
    }
    options.join(", ")
}

/// `CREATE TABLE` for the snapshot signal table: one row per request, read from the stream
/// (never polled), so a request is ordered with the changes around it.
pub fn signal_table_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, pipeline text NOT NULL, relation text, filter text, requested_at timestamptz NOT NULL DEFAULT now())",
        quote_relation(table)
    )
}

/// The signal table for on-demand snapshots, created with `create_if_missing`: published with
/// the pipelines' tables (added to `wanted`). `None` when it does not exist (said once).
pub(super) async fn signal_table(
    c: &Checks<'_>,
    cfg: &PostgresSourceConfig,
    wanted: &mut BTreeSet<String>,
) -> Result<Option<String>, SourceError> {
    let mut signal_table = None;
    if let Some(sig) = cfg.signal_table() {
        let exists: bool = c
            .client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quote_relation(&sig)])
            .await
            .map_err(|e| c.sql(e))?
            .get(0);
        if !exists && cfg.create_if_missing {
            c.apply(&signal_table_ddl(&sig), format!("create the snapshot signal table {sig}")).await?;
            if c.dry_run {
                return Ok(None); // not there to check yet; the start creates and publishes it
            }
        }
        if exists || cfg.create_if_missing {
            wanted.insert(sig.clone());
            signal_table = Some(sig);
        } else {
            tracing::info!(source = c.name, table = %sig, ddl = %signal_table_ddl(&sig), "no snapshot signal table: on-demand snapshots need it (create it and add it to the publication, or set create_if_missing)");
        }
    }
    Ok(signal_table)
}

/// Every table a pipeline names must exist.
pub(super) async fn require_tables(
    c: &Checks<'_>,
    info: &ConnInfo,
    wanted: &BTreeSet<String>,
) -> Result<(), SourceError> {
    let mut missing_tables = Vec::new();
    for t in wanted {
        let exists: bool = c
            .client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quote_relation(t)])
            .await
            .map_err(|e| c.sql(e))?
            .get(0);
        if !exists {
            missing_tables.push(c.named(t));
        }
    }
    if !missing_tables.is_empty() {
        return Err(c.refuse(format!(
            "tables named by pipelines do not exist in database {:?}: {}",
            info.dbname,
            missing_tables.join(", ")
        )));
    }

    Ok(())
}

/// The publication exists and includes every wanted table (created or extended with
/// `create_if_missing`, otherwise refused with the statement to run).
pub(super) async fn ensure_publication(
    c: &Checks<'_>,
    cfg: &PostgresSourceConfig,
    info: &ConnInfo,
    wanted: &BTreeSet<String>,
    server_version: u32,
) -> Result<(), SourceError> {
    let publication = &cfg.publication;
    let pub_row = c
        .client
        .query_opt("SELECT puballtables FROM pg_publication WHERE pubname = $1", &[&publication])
        .await
        .map_err(|e| c.sql(e))?;
    match pub_row {
        None if cfg.create_if_missing => {
            if wanted.is_empty() {
                return Err(c.refuse(format!(
                    "publication {publication:?} does not exist and no table is named to create it with; list tables in the source's tables = [...] or in a pipeline's match.relations"
                )));
            }
            let list: Vec<String> = wanted.iter().map(|t| quote_relation(t)).collect();
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH ({})",
                quote_ident(publication),
                list.join(", "),
                publication_options(server_version)
            );
            c.apply(&sql, format!("create publication {publication} for {}", list.join(", "))).await?;
        }
        None => {
            return Err(c.refuse(format!(
                "publication {publication:?} does not exist in database {:?}; create it (CREATE PUBLICATION {} FOR TABLE {} WITH ({})) or set create_if_missing = true",
                info.dbname,
                quote_ident(publication),
                wanted.iter().map(|t| quote_relation(t)).collect::<Vec<_>>().join(", "),
                publication_options(server_version)
            )));
        }
        Some(r) => {
            let all_tables: bool = r.get(0);
            if !all_tables {
                // Members named explicitly (a partitioned parent is listed here, while
                // pg_publication_tables lists its partitions unless publish_via_partition_root
                // is set) and members through FOR TABLES IN SCHEMA.
                let published: BTreeSet<String> = c
                    .client
                    .query(
                        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 \
                         UNION SELECT n.nspname || '.' || c.relname FROM pg_publication_rel pr \
                         JOIN pg_publication p ON p.oid = pr.prpubid JOIN pg_class c ON c.oid = pr.prrelid \
                         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = $1",
                        &[&publication],
                    )
                    .await
                    .map_err(|e| c.sql(e))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let missing: Vec<&String> = wanted.iter().filter(|t| !published.contains(*t)).collect();
                if !missing.is_empty() {
                    if cfg.create_if_missing {
                        let list: Vec<String> = missing.iter().map(|t| quote_relation(t)).collect();
                        let sql =
                            format!("ALTER PUBLICATION {} ADD TABLE {}", quote_ident(publication), list.join(", "));
                        c.apply(&sql, format!("add {} to publication {publication}", list.join(", "))).await?;
                    } else {
                        return Err(c.refuse(format!(
                            "publication {publication:?} does not include {}; ALTER PUBLICATION {} ADD TABLE {} (or set create_if_missing = true)",
                            missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                            quote_ident(publication),
                            missing.iter().map(|t| quote_relation(t)).collect::<Vec<_>>().join(", ")
                        )));
                    }
                }
            }
        }
    }

    Ok(())
}

/// Partitioned tables: their changes carry the parent's name only with
/// publish_via_partition_root; without it a pipeline matching the parent would get nothing.
pub(super) async fn require_partition_root(
    c: &Checks<'_>,
    publication: &str,
    wanted: &BTreeSet<String>,
) -> Result<(), SourceError> {
    // No publication yet (a dry run before the first start): the one polysync creates has it.
    let Some(row) = c
        .client
        .query_opt("SELECT pubviaroot FROM pg_publication WHERE pubname = $1", &[&publication])
        .await
        .map_err(|e| c.sql(e))?
    else {
        return Ok(());
    };
    let via_root: bool = row.get(0);
    if !via_root {
        let partitioned: Vec<String> = c
            .client
            .query(
                "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind = 'p' AND (n.nspname || '.' || c.relname) = ANY($1) ORDER BY 1",
                &[&wanted.iter().cloned().collect::<Vec<_>>()],
            )
            .await
            .map_err(|e| c.sql(e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !partitioned.is_empty() {
            return Err(c.refuse(format!(
                "publication {publication:?} sends the changes of the partitioned table(s) {} under each partition's name \
                 (publish_via_partition_root is off), so no pipeline matching the parent would receive them; \
                 ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                partitioned.join(", "),
                quote_ident(publication)
            )));
        }
    }
    Ok(())
}

/// PostgreSQL 18 publishes stored generated columns when the publication asks for them;
/// snapshots then read them too, so both paths give the same row.
pub(super) async fn publishes_generated(
    c: &Checks<'_>,
    publication: &str,
    server_version: u32,
) -> Result<bool, SourceError> {
    if server_version < 180_000 {
        return Ok(false);
    }
    let row = c
        .client
        .query_opt("SELECT pubgencols::text FROM pg_publication WHERE pubname = $1", &[&publication])
        .await
        .map_err(|e| c.sql(e))?;
    // No publication yet (a dry run): the one polysync creates publishes them.
    Ok(row.is_none_or(|r| r.get::<_, String>(0) == "s"))
}
