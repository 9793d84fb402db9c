//! Start-up checks and set-up on the normal connection: `wal_level`, privileges, the
//! publication, the slot, replica identities and the columns pipelines name. Each refusal says
//! exactly what is missing and how to fix it, because the person reading it is about to edit a
//! parameter group or run one SQL statement.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::SourceError;
use super::config::{ConnInfo, PostgresSourceConfig};
use crate::tls::TlsMode;

/// Connect the normal (SQL) connection; its driver task runs in the background.
pub async fn connect_sql(info: &ConnInfo, source: &str) -> Result<Client, SourceError> {
    let cfg = info.tokio_config();
    let net = |e: tokio_postgres::Error| SourceError::Connect {
        source_name: source.to_string(),
        endpoint: info.endpoint(),
        msg: pg_error_text(&e),
        transient: is_transient_pg(&e),
    };
    if info.tls == TlsMode::Disable {
        let (client, conn) = cfg.connect(NoTls).await.map_err(net)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    } else {
        let tls = crate::tls::client_config(info.tls, info.ca_file.as_deref())
            .map_err(|e| SourceError::Connect {
                source_name: source.to_string(),
                endpoint: info.endpoint(),
                msg: e.to_string(),
                transient: false,
            })?
            .expect("mode is not disable");
        let (client, conn) = cfg.connect(MakeRustlsConnect::new(tls)).await.map_err(net)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

/// The server's message (with detail) rather than tokio-postgres's generic "db error".
pub fn pg_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!(" hint: {h}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            s
        }
    }
}

/// Network-ish failures heal; SQL errors about privileges or objects do not.
pub fn is_transient_pg(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        // Certificate and TLS failures are configuration, not weather.
        None => {
            let text = pg_error_text(e).to_lowercase();
            !(text.contains("tls") || text.contains("certificate") || text.contains("password"))
        }
        Some(c) => {
            let c = c.code();
            c.starts_with("08") || c.starts_with("57P") || c == "53300" || c == "40001" || c == "40P01"
        }
    }
}

/// What start-up learned about the published tables.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    /// Every type's name, domain base and array element: how columns are decoded.
    pub types: super::types::Types,
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

/// The options of a publication polysync creates: partitioned tables publish under the
/// parent's name (13+), and stored generated columns are part of the row (18+).
pub fn publication_options(server_version: u32) -> String {
    let mut options = vec!["publish_via_partition_root = true"];
    if server_version >= 180_000 {
        options.push("publish_generated_columns = stored");
    }
    options.join(", ")
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `schema.table` → `"schema"."table"`.
pub fn quote_relation(rel: &str) -> String {
    match rel.split_once('.') {
        Some((s, t)) => format!("{}.{}", quote_ident(s), quote_ident(t)),
        None => quote_ident(rel),
    }
}

/// `CREATE TABLE` for the snapshot signal table: one row per request, read from the stream
/// (never polled), so a request is ordered with the changes around it.
pub fn signal_table_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, pipeline text NOT NULL, relation text, filter text, requested_at timestamptz NOT NULL DEFAULT now())",
        quote_relation(table)
    )
}

/// What every other check needs first: logical decoding on, and a role that may stream. Run
/// before anything opens a replication connection, so a missing grant is named with its fix.
pub async fn preflight(client: &Client, name: &str, info: &ConnInfo) -> Result<(), SourceError> {
    let refuse = |msg: String| SourceError::Setup { source_name: name.to_string(), msg };
    let sql = |e: tokio_postgres::Error| SourceError::Setup { source_name: name.to_string(), msg: pg_error_text(&e) };
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await.map_err(sql)?.get(0);
    if wal_level != "logical" {
        return Err(refuse(format!(
            "wal_level is {wal_level:?} on {}; logical replication needs wal_level=logical (self-managed: set it in postgresql.conf and restart; RDS/Aurora: set rds.logical_replication=1 in the parameter group and reboot)",
            info.endpoint()
        )));
    }

    let row = client
        .query_one(
            "SELECT r.rolsuper OR r.rolreplication \
                 OR EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = 'rds_replication' AND pg_has_role(r.oid, g.oid, 'member')) \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(sql)?;
    if !row.get::<_, bool>(0) {
        return Err(refuse(format!(
            "role {:?} cannot stream changes: it needs REPLICATION (ALTER ROLE {} REPLICATION; on RDS/Aurora: GRANT rds_replication TO {})",
            info.user,
            quote_ident(&info.user),
            quote_ident(&info.user)
        )));
    }
    Ok(())
}

/// Check (and, with `create_if_missing`, create) everything the stream needs; `create_slot`
/// creates a missing slot regardless (`on_slot_lost = "resnapshot"` asked for a new one).
/// Everything is on the writer (`client`) except, with standby decoding, the slot (`standby`).
///
/// `wanted` are the exact relations the pipelines name (plus `tables` from the config);
/// `patterns` are wildcard prefixes the pipelines use, checked against what is published.
pub async fn prepare(
    client: &Client,
    name: &str,
    cfg: &PostgresSourceConfig,
    info: &ConnInfo,
    wanted: &BTreeSet<String>,
    create_slot: bool,
    standby: Option<(&Client, &ConnInfo)>,
) -> Result<Catalog, SourceError> {
    let refuse = |msg: String| SourceError::Setup { source_name: name.to_string(), msg };
    let sql = |e: tokio_postgres::Error| SourceError::Setup { source_name: name.to_string(), msg: pg_error_text(&e) };

    preflight(client, name, info).await?;

    let server_version: u32 =
        client.query_one("SHOW server_version_num", &[]).await.map_err(sql)?.get::<_, String>(0).parse().unwrap_or(0);
    // The signal table for on-demand snapshots: published with the pipelines' tables.
    let mut wanted = wanted.clone();
    let mut signal_table = None;
    if let Some(sig) = cfg.signal_table() {
        let exists: bool =
            client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&quote_relation(&sig)]).await.map_err(sql)?.get(0);
        if !exists && cfg.create_if_missing {
            client.batch_execute(&signal_table_ddl(&sig)).await.map_err(sql)?;
            tracing::info!(source = name, table = %sig, "created the snapshot signal table");
        }
        if exists || cfg.create_if_missing {
            wanted.insert(sig.clone());
            signal_table = Some(sig);
        } else {
            tracing::info!(source = name, table = %sig, ddl = %signal_table_ddl(&sig), "no snapshot signal table: on-demand snapshots need it (create it and add it to the publication, or set create_if_missing)");
        }
    }
    let wanted = &wanted;

    // Tables that must exist.
    let mut missing_tables = Vec::new();
    for t in wanted {
        let exists: bool =
            client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&quote_relation(t)]).await.map_err(sql)?.get(0);
        if !exists {
            missing_tables.push(t.clone());
        }
    }
    if !missing_tables.is_empty() {
        return Err(refuse(format!(
            "tables named by pipelines do not exist in database {:?}: {}",
            info.dbname,
            missing_tables.join(", ")
        )));
    }

    // Publication.
    let publication = &cfg.publication;
    let pub_row = client
        .query_opt("SELECT puballtables FROM pg_publication WHERE pubname = $1", &[publication])
        .await
        .map_err(sql)?;
    match pub_row {
        None if cfg.create_if_missing => {
            if wanted.is_empty() {
                return Err(refuse(format!(
                    "publication {publication:?} does not exist and no table is named to create it with; list tables in the source's tables = [...] or in a pipeline's match.relations"
                )));
            }
            let list: Vec<String> = wanted.iter().map(|t| quote_relation(t)).collect();
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {} WITH ({})",
                    quote_ident(publication),
                    list.join(", "),
                    publication_options(server_version)
                ))
                .await
                .map_err(sql)?;
            tracing::info!(source = name, publication = %publication, tables = %list.join(", "), "created publication");
        }
        None => {
            return Err(refuse(format!(
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
                let published: BTreeSet<String> = client
                    .query(
                        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 \
                         UNION SELECT n.nspname || '.' || c.relname FROM pg_publication_rel pr \
                         JOIN pg_publication p ON p.oid = pr.prpubid JOIN pg_class c ON c.oid = pr.prrelid \
                         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = $1",
                        &[publication],
                    )
                    .await
                    .map_err(sql)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let missing: Vec<&String> = wanted.iter().filter(|t| !published.contains(*t)).collect();
                if !missing.is_empty() {
                    if cfg.create_if_missing {
                        let list: Vec<String> = missing.iter().map(|t| quote_relation(t)).collect();
                        client
                            .batch_execute(&format!(
                                "ALTER PUBLICATION {} ADD TABLE {}",
                                quote_ident(publication),
                                list.join(", ")
                            ))
                            .await
                            .map_err(sql)?;
                        tracing::info!(source = name, publication = %publication, tables = %list.join(", "), "added tables to publication");
                    } else {
                        return Err(refuse(format!(
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

    // Partitioned tables: their changes carry the parent's name only with
    // publish_via_partition_root; without it a pipeline matching the parent would get nothing.
    let via_root: bool = client
        .query_one("SELECT pubviaroot FROM pg_publication WHERE pubname = $1", &[publication])
        .await
        .map_err(sql)?
        .get(0);
    if !via_root {
        let partitioned: Vec<String> = client
            .query(
                "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind = 'p' AND (n.nspname || '.' || c.relname) = ANY($1) ORDER BY 1",
                &[&wanted.iter().cloned().collect::<Vec<_>>()],
            )
            .await
            .map_err(sql)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !partitioned.is_empty() {
            return Err(refuse(format!(
                "publication {publication:?} sends the changes of the partitioned table(s) {} under each partition's name \
                 (publish_via_partition_root is off), so no pipeline matching the parent would receive them; \
                 ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                partitioned.join(", "),
                quote_ident(publication)
            )));
        }
    }
    // PostgreSQL 18 publishes stored generated columns when the publication asks for them;
    // snapshots then read them too, so both paths give the same row.
    let publishes_generated = server_version >= 180_000 && {
        let g: String = client
            .query_one("SELECT pubgencols::text FROM pg_publication WHERE pubname = $1", &[publication])
            .await
            .map_err(sql)?
            .get(0);
        g == "s"
    };
    let mut catalog =
        Catalog { published: BTreeSet::new(), server_version, signal_table, publishes_generated, ..Catalog::default() };
    catalog.published = client
        .query("SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1", &[publication])
        .await
        .map_err(sql)?
        .iter()
        .map(|r| r.get(0))
        .collect();

    // Replica identity: updates and deletes of a table with neither a primary key nor
    // REPLICA IDENTITY FULL/INDEX carry no key, so they could not be routed or applied.
    let rows = client
        .query(
            "SELECT n.nspname || '.' || c.relname, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident) \
             FROM pg_publication_tables pt \
             JOIN pg_namespace n ON n.nspname = pt.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
             WHERE pt.pubname = $1",
            &[publication],
        )
        .await
        .map_err(sql)?;
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
        return Err(refuse(format!(
            "published tables without a primary key or replica identity index: {} (their updates and deletes carry no key; add a primary key, or a unique index on NOT NULL columns and ALTER TABLE … REPLICA IDENTITY USING INDEX …)",
            keyless.join(", ")
        )));
    }

    for r in client
        .query(
            "SELECT n.nspname || '.' || c.relname, a.attname \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
             WHERE i.indisprimary AND (n.nspname || '.' || c.relname) = ANY($1) ORDER BY 1, k.ord",
            &[&catalog.published.iter().cloned().collect::<Vec<_>>()],
        )
        .await
        .map_err(sql)?
    {
        catalog.primary_keys.entry(r.get(0)).or_default().push(r.get(1));
    }
    let mut identity_keys: HashMap<String, Vec<String>> = HashMap::new();
    for r in client
        .query(
            "SELECT n.nspname || '.' || c.relname, a.attname \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
             WHERE i.indisreplident AND (n.nspname || '.' || c.relname) = ANY($1) ORDER BY 1, k.ord",
            &[&identity_index.iter().cloned().collect::<Vec<_>>()],
        )
        .await
        .map_err(sql)?
    {
        identity_keys.entry(r.get(0)).or_default().push(r.get(1));
    }
    for t in &catalog.published {
        let key = identity_keys.remove(t).or_else(|| catalog.primary_keys.get(t).cloned());
        if let Some(k) = key {
            catalog.key_columns.insert(t.clone(), k);
        }
    }
    for r in client
        .query(
            "SELECT n.nspname || '.' || c.relname, a.attname FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE a.attnum > 0 AND NOT a.attisdropped AND (n.nspname || '.' || c.relname) = ANY($1) ORDER BY 1, a.attnum",
            &[&catalog.published.iter().cloned().collect::<Vec<_>>()],
        )
        .await
        .map_err(sql)?
    {
        catalog.columns.entry(r.get(0)).or_default().push(r.get(1));
    }
    // Each table's shape as pgoutput describes it (generated columns only when published), the
    // baseline column changes are judged against.
    for r in client
        .query(
            "SELECT n.nspname || '.' || c.relname, a.attname::text, a.atttypid FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE a.attnum > 0 AND NOT a.attisdropped AND (a.attgenerated = '' OR (a.attgenerated = 's' AND $2)) \
               AND (n.nspname || '.' || c.relname) = ANY($1) ORDER BY 1, a.attnum",
            &[&catalog.published.iter().cloned().collect::<Vec<_>>(), &catalog.publishes_generated],
        )
        .await
        .map_err(sql)?
    {
        catalog.shapes.entry(r.get(0)).or_default().push((r.get(1), r.get(2)));
    }
    for r in client
        .query(
            "SELECT t.oid, t.typname::text, n.nspname::text, t.typbasetype, \
                    CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0::oid END \
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace",
            &[],
        )
        .await
        .map_err(sql)?
    {
        let (oid, name, namespace, base, element): (u32, String, String, u32, u32) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        catalog.types.insert(oid, super::types::qualified_type_name(&namespace, &name), base, element);
    }

    match standby {
        None => ensure_slot(client, None, name, cfg, info, server_version, create_slot).await?,
        Some((standby, standby_info)) => {
            ensure_slot(standby, Some(client), name, cfg, standby_info, server_version, create_slot).await?
        }
    }
    Ok(catalog)
}

/// Check (and, with `create_if_missing` or `create_slot`, create) the slot on `slot_client`:
/// the writer, or with standby decoding the standby, where creating it waits for a
/// running-xacts record from the primary, which `primary` is asked for meanwhile
/// (`pg_log_standby_snapshot`, PostgreSQL 16+). A failover slot where the server has them.
pub async fn ensure_slot(
    slot_client: &Client,
    primary: Option<&Client>,
    name: &str,
    cfg: &PostgresSourceConfig,
    info: &ConnInfo,
    server_version: u32,
    create_slot: bool,
) -> Result<(), SourceError> {
    let refuse = |msg: String| SourceError::Setup { source_name: name.to_string(), msg };
    let sql = |e: tokio_postgres::Error| SourceError::Setup { source_name: name.to_string(), msg: pg_error_text(&e) };
    let slot = &cfg.slot;
    let slot_row = slot_client
        .query_opt("SELECT plugin, database, slot_type FROM pg_replication_slots WHERE slot_name = $1", &[slot])
        .await
        .map_err(sql)?;
    match slot_row {
        None if cfg.create_if_missing || create_slot => {
            match primary {
                None => {
                    slot_client
                        .query_one(super::failover::create_slot_sql(server_version), &[slot])
                        .await
                        .map_err(sql)?;
                }
                Some(primary) => {
                    // Failover slots cannot be created on a standby; a plain one then.
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [slot];
                    let create = slot_client.query_one(super::failover::create_slot_sql(0), &params);
                    tokio::pin!(create);
                    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
                    loop {
                        tokio::select! {
                            r = &mut create => { r.map_err(sql)?; break; }
                            _ = tick.tick() => { let _ = primary.execute("SELECT pg_log_standby_snapshot()", &[]).await; }
                        }
                    }
                }
            }
            tracing::info!(source = name, slot = %slot, endpoint = %info.endpoint(), "created replication slot");
        }
        None => {
            return Err(refuse(format!(
                "replication slot {slot:?} does not exist on {}; create it (SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')) or set create_if_missing = true",
                info.endpoint()
            )));
        }
        Some(r) => {
            let plugin: Option<String> = r.get(0);
            let database: Option<String> = r.get(1);
            let kind: String = r.get(2);
            if kind != "logical" || plugin.as_deref() != Some("pgoutput") {
                return Err(refuse(format!(
                    "slot {slot:?} is a {kind} slot with plugin {plugin:?}; polysync needs a logical slot with pgoutput"
                )));
            }
            if database.as_deref() != Some(info.dbname.as_str()) {
                return Err(refuse(format!("slot {slot:?} belongs to database {database:?}, not {:?}", info.dbname)));
            }
        }
    }
    Ok(())
}

/// Check that the columns templates name exist (for pipelines without a transform), so a typo
/// is a start-up error rather than a dead letter per change.
pub fn check_columns(catalog: &Catalog, checks: &BTreeMap<String, Vec<(String, String)>>) -> Result<(), String> {
    let mut problems = Vec::new();
    for (relation, fields) in checks {
        let Some(cols) = catalog.columns.get(relation) else {
            continue;
        };
        for (pipeline, column) in fields {
            if !cols.iter().any(|c| c == column) {
                problems.push(format!(
                    "pipeline {pipeline}: table {relation} has no column {column:?} (columns: {})",
                    cols.join(", ")
                ));
            }
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}
