//! The replication slot: present, logical, pgoutput, in this database; created where allowed
//! (a failover slot where the server has them; on a standby, nudging the primary).

use tokio_postgres::Client;

use super::pg_error_text;
use crate::source::SourceError;
use crate::source::postgres::config::{ConnInfo, PostgresSourceConfig};

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
                        .query_one(crate::source::postgres::failover::create_slot_sql(server_version), &[slot])
                        .await
                        .map_err(sql)?;
                }
                Some(primary) => {
                    // Failover slots cannot be created on a standby; a plain one then.
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [slot];
                    let create = slot_client.query_one(crate::source::postgres::failover::create_slot_sql(0), &params);
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
