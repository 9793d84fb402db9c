//! Start-up checks and set-up on the normal connection: `wal_level`, privileges, the
//! publication, the slot, replica identities and the columns pipelines name. Each refusal says
//! exactly what is missing and how to fix it, because the person reading it is about to edit a
//! parameter group or run one SQL statement.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::source::SourceError;
use crate::source::postgres::config::{ConnInfo, PostgresSourceConfig};
use crate::tls::TlsMode;

mod catalog;
mod publication;
mod slot;

pub use catalog::Catalog;
pub use publication::{publication_options, signal_table_ddl};
pub use slot::ensure_slot;

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

/// The tables a start needs (the exact relations the pipelines name, plus the source's
/// `tables`) and where the pipelines name them, for messages about a missing one.
#[derive(Clone, Copy)]
pub struct Wanted<'a> {
    /// Relations.
    pub tables: &'a BTreeSet<String>,
    /// Relation → "pipeline (file:line:col)".
    pub sites: &'a BTreeMap<String, String>,
}

/// The connection and the source's name, with the two ways a check fails: a refusal a person
/// must act on, or the server's error. In a dry run (`check --online`) nothing is created:
/// what a start would create is written down instead.
pub(super) struct Checks<'a> {
    pub(super) client: &'a Client,
    pub(super) name: &'a str,
    pub(super) dry_run: bool,
    pub(super) planned: std::sync::Mutex<Vec<String>>,
    /// Where the pipelines name each table (for the message about a missing one).
    pub(super) sites: &'a BTreeMap<String, String>,
}

impl Checks<'_> {
    /// `table`, with the pipeline that names it and where, when one does.
    pub(super) fn named(&self, table: &str) -> String {
        match self.sites.get(table) {
            Some(site) => format!("{table} (named by pipeline {site})"),
            None => table.to_string(),
        }
    }

    pub(super) fn refuse(&self, msg: String) -> SourceError {
        SourceError::Setup { source_name: self.name.to_string(), msg }
    }

    pub(super) fn sql(&self, e: tokio_postgres::Error) -> SourceError {
        SourceError::Setup { source_name: self.name.to_string(), msg: pg_error_text(&e) }
    }

    /// Run a statement that creates or changes something (`what` says what, for the log), or
    /// in a dry run only record that the start would.
    pub(super) async fn apply(&self, sql: &str, what: String) -> Result<(), SourceError> {
        if self.dry_run {
            self.planned.lock().unwrap_or_else(|p| p.into_inner()).push(format!("the first start would {what}"));
            return Ok(());
        }
        self.client.batch_execute(sql).await.map_err(|e| self.sql(e))?;
        tracing::info!(source = self.name, "{what}");
        Ok(())
    }
}

pub(super) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `schema.table` → `"schema"."table"`.
pub fn quote_relation(rel: &str) -> String {
    match rel.split_once('.') {
        Some((s, t)) => format!("{}.{}", quote_ident(s), quote_ident(t)),
        None => quote_ident(rel),
    }
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
/// `wanted` are the exact relations the pipelines name (plus `tables` from the config) and
/// where the pipelines name them;
/// `patterns` are wildcard prefixes the pipelines use, checked against what is published.
pub async fn prepare(
    client: &Client,
    name: &str,
    cfg: &PostgresSourceConfig,
    info: &ConnInfo,
    wanted: Wanted<'_>,
    create_slot: bool,
    standby: Option<(&Client, &ConnInfo)>,
) -> Result<Catalog, SourceError> {
    preflight(client, name, info).await?;
    let c = Checks { client, name, dry_run: false, planned: Default::default(), sites: wanted.sites };
    let catalog = writer_checks(&c, cfg, info, wanted.tables).await?;
    let server_version = catalog.server_version;
    match standby {
        None => ensure_slot(client, None, name, cfg, info, server_version, create_slot).await?,
        Some((standby, standby_info)) => {
            ensure_slot(standby, Some(client), name, cfg, standby_info, server_version, create_slot).await?
        }
    }
    Ok(catalog)
}

/// The read-only half of [`prepare`] for `polysync check --online`: every check a start makes
/// on the writer (signal table, tables, publication and its members, partitioned tables, keys
/// and replica identity, columns), with what the start would create listed instead of done.
/// The slot is judged separately (against polysync's record).
pub async fn inspect(
    client: &Client,
    name: &str,
    cfg: &PostgresSourceConfig,
    info: &ConnInfo,
    wanted: Wanted<'_>,
) -> Result<(Catalog, Vec<String>), SourceError> {
    let c = Checks { client, name, dry_run: true, planned: Default::default(), sites: wanted.sites };
    let catalog = writer_checks(&c, cfg, info, wanted.tables).await?;
    let planned = c.planned.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok((catalog, planned))
}

/// Every check on the writer, in order, shared by a start and a dry run: the signal table,
/// the tables, the publication and its members, partitioned tables, generated columns, then
/// what the catalog says about the published tables.
async fn writer_checks(
    c: &Checks<'_>,
    cfg: &PostgresSourceConfig,
    info: &ConnInfo,
    wanted: &BTreeSet<String>,
) -> Result<Catalog, SourceError> {
    let server_version: u32 = c
        .client
        .query_one("SHOW server_version_num", &[])
        .await
        .map_err(|e| c.sql(e))?
        .get::<_, String>(0)
        .parse()
        .unwrap_or(0);
    let mut wanted = wanted.clone();
    let signal_table = publication::signal_table(c, cfg, &mut wanted).await?;
    publication::require_tables(c, info, &wanted).await?;
    publication::ensure_publication(c, cfg, info, &wanted, server_version).await?;
    publication::require_partition_root(c, &cfg.publication, &wanted).await?;
    let publishes_generated = publication::publishes_generated(c, &cfg.publication, server_version).await?;
    let mut catalog =
        Catalog { published: BTreeSet::new(), server_version, signal_table, publishes_generated, ..Catalog::default() };
    catalog::read(c, &cfg.publication, &wanted, &mut catalog).await?;
    Ok(catalog)
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
