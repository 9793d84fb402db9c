//! A slot knows its consumer. Confirming a position tells the server that every change before
//! it was delivered — to the pipelines of the config that confirms. A second config streaming
//! from the same slot with fewer pipelines (copied and trimmed, a test run against production)
//! would confirm changes the other pipelines then never see. So polysync records, in a small
//! table on the writer, which installation consumes each slot and for which pipelines, and a
//! start that would consume it on behalf of fewer pipelines than recorded is refused with the
//! reason (`take_over_slot = true` moves the slot on purpose).

use std::path::Path;

use tokio_postgres::Client;

use super::config::PostgresSourceConfig;
use super::setup::pg_error_text;
use crate::source::SourceError;

/// The table (in the database the slot decodes, never published).
pub const TABLE: &str = "public.polysync_slot_consumers";

const DDL: &str = "CREATE TABLE IF NOT EXISTS public.polysync_slot_consumers (\
     slot text PRIMARY KEY, owner text NOT NULL, pipelines text[] NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())";

/// This installation: the host and the state directory (where its checkpoints live).
pub fn owner(state_dir: &Path) -> String {
    let dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}:{}", dir.display())
}

/// Record this config as the slot's consumer, or refuse when another installation consumes it
/// for pipelines this config does not run. `pipelines` are this source's pipeline names.
pub async fn claim(
    client: &Client,
    name: &str,
    cfg: &PostgresSourceConfig,
    state_dir: &Path,
    pipelines: &[String],
) -> Result<(), SourceError> {
    let sql = |e: tokio_postgres::Error| SourceError::Setup { source_name: name.to_string(), msg: pg_error_text(&e) };
    let exists: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&TABLE]).await.map_err(sql)?.get(0);
    if !exists {
        if !cfg.create_if_missing {
            tracing::info!(source = name, slot = %cfg.slot, ddl = DDL, "no slot consumer record: without it a second config on this slot is not detected (create the table, or set create_if_missing)");
            return Ok(());
        }
        client.batch_execute(DDL).await.map_err(sql)?;
    }
    let me = owner(state_dir);
    let mut ours: Vec<String> = pipelines.to_vec();
    ours.sort();
    ours.dedup();
    let row = client
        .query_opt(&format!("SELECT owner, pipelines FROM {TABLE} WHERE slot = $1"), &[&cfg.slot])
        .await
        .map_err(sql)?;
    if let Some(r) = row {
        let (them, recorded): (String, Vec<String>) = (r.get(0), r.get(1));
        if them != me {
            let missing: Vec<&String> = recorded.iter().filter(|p| !ours.contains(p)).collect();
            if !missing.is_empty() && !cfg.take_over_slot {
                return Err(SourceError::Setup {
                    source_name: name.to_string(),
                    msg: format!(
                        "slot {:?} is consumed by another polysync ({them}) for pipelines [{}]; this config does not run [{}], so it would confirm changes those pipelines never saw. Stop the other one and use its config, give this one its own slot, or set take_over_slot = true to move the slot here",
                        cfg.slot,
                        recorded.join(", "),
                        missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
            tracing::warn!(source = name, slot = %cfg.slot, from = %them, to = %me, "the slot's consumer moves to this config");
        }
    }
    client
        .execute(
            &format!(
                "INSERT INTO {TABLE} (slot, owner, pipelines) VALUES ($1, $2, $3) \
                 ON CONFLICT (slot) DO UPDATE SET owner = EXCLUDED.owner, pipelines = EXCLUDED.pipelines, updated_at = now()"
            ),
            &[&cfg.slot, &me, &ours],
        )
        .await
        .map_err(sql)?;
    Ok(())
}
