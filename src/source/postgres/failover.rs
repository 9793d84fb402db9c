//! Failover readiness: whether the slot survives the promotion of a standby.
//!
//! From PostgreSQL 17 a logical slot created with `failover = true` is copied to standbys
//! that run with `sync_replication_slots = on`, so after a promotion polysync resumes from the
//! copy. It works only when several settings agree on two servers; a missing one shows up as
//! a lost slot, or worse as sinks holding changes the new primary never received, on the day
//! of the failover. So polysync reads them at start (and in `check --online`) and names each
//! gap with its fix.

use tokio_postgres::Client;

use super::config::{ConnInfo, Target};
use super::replication::ReplConnection;
use super::setup::pg_error_text;

/// First `server_version_num` with failover slots.
pub const FAILOVER_SLOTS: u32 = 170_000;

/// `pg_create_logical_replication_slot` for this server: a failover slot where the server has
/// them.
pub fn create_slot_sql(server_version: u32) -> &'static str {
    if server_version >= FAILOVER_SLOTS {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
    }
}

/// One gap in failover readiness, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Which server it is about (`host:port/db`).
    pub server: String,
    /// What is wrong and its fix.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.server, self.message)
    }
}

/// What to do with an existing slot that is not a failover slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotFix {
    /// Make it one (`create_if_missing`: polysync manages the slot).
    Convert,
    /// Say so with the command to run.
    Report,
    /// `check --online` of a config that would convert it: say the start will.
    AtStart,
}

/// Read the writer's side: is the slot a failover slot (see [`SlotFix`]), and do logical
/// walsenders wait for the physical standbys?
pub async fn writer_findings(
    client: &Client,
    info: &ConnInfo,
    slot: &str,
    server_version: u32,
    fix: SlotFix,
) -> Result<Vec<Finding>, String> {
    let mut out = Vec::new();
    let writer = format!("the writer of {}", info.endpoint());
    let mut say = |message: String| out.push(Finding { server: writer.clone(), message });
    let physical: Vec<String> = client
        .query("SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical' ORDER BY 1", &[])
        .await
        .map_err(|e| pg_error_text(&e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if server_version < FAILOVER_SLOTS {
        if !physical.is_empty() {
            say(format!(
                "PostgreSQL {} has no failover slots: a promotion of a standby (physical slots {}) leaves slot {slot:?} behind, and the next start applies on_slot_lost (PostgreSQL 17 keeps a copy on the standby)",
                server_version / 10_000,
                physical.join(", ")
            ));
        }
        return Ok(out);
    }
    let failover: Option<bool> = client
        .query_opt("SELECT failover FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .map_err(|e| pg_error_text(&e))?
        .map(|r| r.get(0));
    if failover == Some(false) {
        let alter = format!("ALTER_REPLICATION_SLOT {slot} (FAILOVER true)");
        let converted = match fix {
            SlotFix::Convert => alter_slot(info, &alter).await,
            SlotFix::Report => Err("create_if_missing is off".to_string()),
            SlotFix::AtStart => Err("the next start makes it one (create_if_missing)".to_string()),
        };
        match converted {
            Ok(()) => tracing::info!(
                slot,
                "made the replication slot a failover slot (standbys with sync_replication_slots keep a copy)"
            ),
            Err(why) => say(format!(
                "slot {slot:?} is not a failover slot, so no standby keeps a copy and a failover loses it ({why}); run `{alter}` on a replication connection (psql \"dbname=… replication=database\") while polysync is stopped"
            )),
        }
    }
    let synchronized: String = client
        .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
        .await
        .map_err(|e| pg_error_text(&e))?
        .get(0);
    let listed: Vec<&str> = synchronized.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if listed.is_empty() && !physical.is_empty() {
        say(format!(
            "synchronized_standby_slots is empty while standbys stream through physical slots {}: polysync can receive and apply changes a standby has not got yet, and after a failover to it the sinks hold changes the new primary never had; set synchronized_standby_slots = '{}'",
            physical.join(", "),
            physical.join(",")
        ));
    }
    for name in listed {
        if !physical.iter().any(|p| p == name) {
            say(format!(
                "synchronized_standby_slots names {name:?}, which is not a physical slot on this server: logical decoding waits for it, so polysync stalls until it exists"
            ));
        }
    }
    Ok(out)
}

/// `ALTER_REPLICATION_SLOT` is a replication command (there is no SQL function for it).
async fn alter_slot(info: &ConnInfo, command: &str) -> Result<(), String> {
    let mut conn = ReplConnection::connect(info).await.map_err(|e| e.to_string())?;
    let r = conn.simple_query(command).await.map(|_| ()).map_err(|e| e.to_string());
    conn.close().await;
    r
}

/// Read each standby among `info.hosts` (the candidates that are in recovery): does it keep a
/// copy of the slot, and are the settings slot synchronisation needs in place? Unreachable
/// standbys are named too: a failover to them is a failover to the unknown.
pub async fn standby_findings(info: &ConnInfo, slot: &str, server_version: u32) -> Vec<Finding> {
    let mut out = Vec::new();
    if server_version < FAILOVER_SLOTS || info.hosts.len() < 2 {
        return out;
    }
    let mut writers = Vec::new();
    for cand in info.candidates() {
        let server = cand.endpoint();
        let mut say = |message: String| out.push(Finding { server: server.clone(), message });
        let any = ConnInfo { target: Target::Any, ..cand.clone() };
        let client = match super::setup::connect_sql(&any, "failover check").await {
            Ok(c) => c,
            Err(e) => {
                say(format!("cannot read this standby's settings: {e}"));
                continue;
            }
        };
        match standby_gaps(&client, slot).await {
            Ok(Some(gaps)) => gaps.into_iter().for_each(&mut say),
            Ok(None) => writers.push(server),
            Err(e) => say(format!("cannot read this standby's settings: {e}")),
        }
    }
    if writers.len() > 1 {
        out.push(Finding {
            server: writers.join(", "),
            message: "more than one of hosts is a writer (a split brain, or an old primary started again): polysync streams from the first".into(),
        });
    }
    out
}

/// The gaps of one standby; `None` when the server is not a standby (the writer).
async fn standby_gaps(client: &Client, slot: &str) -> Result<Option<Vec<String>>, String> {
    let sql = |e: tokio_postgres::Error| pg_error_text(&e);
    let mut gaps = Vec::new();
    let in_recovery: bool = client.query_one("SELECT pg_is_in_recovery()", &[]).await.map_err(sql)?.get(0);
    if !in_recovery {
        return Ok(None);
    }
    let setting = |rows: &[tokio_postgres::Row], name: &str| {
        rows.iter().find(|r| r.get::<_, &str>(0) == name).map(|r| r.get::<_, String>(1)).unwrap_or_default()
    };
    let rows = client
        .query(
            "SELECT name::text, setting FROM pg_settings WHERE name IN ('sync_replication_slots', 'hot_standby_feedback', 'primary_slot_name', 'primary_conninfo', 'wal_level')",
            &[],
        )
        .await
        .map_err(sql)?;
    if setting(&rows, "sync_replication_slots") != "on" {
        gaps.push("sync_replication_slots is off: this standby keeps no copy of the slot, and a failover to it loses the slot; set sync_replication_slots = on".into());
    }
    if setting(&rows, "hot_standby_feedback") != "on" {
        gaps.push("hot_standby_feedback is off: slot synchronisation needs it (the primary must keep the rows the copy of the slot still decodes); set hot_standby_feedback = on".into());
    }
    if setting(&rows, "primary_slot_name").is_empty() {
        gaps.push("primary_slot_name is empty: slot synchronisation needs a physical slot on the primary for this standby (and synchronized_standby_slots naming it)".into());
    }
    let conninfo = setting(&rows, "primary_conninfo");
    // Only superusers and pg_read_all_settings see it; judged only when visible.
    if !conninfo.is_empty() && !conninfo.starts_with("****") && !conninfo.contains("dbname=") {
        gaps.push("primary_conninfo has no dbname: the slot synchronisation worker needs one to connect; add dbname=postgres (or any database)".into());
    }
    if setting(&rows, "wal_level") != "logical" {
        gaps.push(
            "wal_level is not logical on this standby: after a promotion it could not decode; set wal_level = logical"
                .into(),
        );
    }
    // A fresh copy stays temporary until the standby's catalog xmin passes the primary's
    // (some write and a running-xacts record, e.g. pg_log_standby_snapshot()): only a
    // persistent copy survives a promotion.
    let synced: Option<(bool, bool)> = client
        .query_opt("SELECT synced, temporary FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .map_err(sql)?
        .map(|r| (r.get(0), r.get(1)));
    match synced {
        Some((true, false)) => {}
        Some((true, true)) => gaps.push(format!(
            "the copy of slot {slot:?} is not sync-ready yet (temporary until this standby has caught up with the slot's catalog horizon; SELECT pg_log_standby_snapshot() on the primary hastens it): a failover now would lose it"
        )),
        Some((false, _)) => gaps.push(format!(
            "slot {slot:?} exists here but is not a synchronised copy (created on the standby itself): a promotion keeps a slot with another history"
        )),
        None => gaps.push(format!(
            "slot {slot:?} is not (yet) synchronised to this standby: a failover now would lose it; it appears once the settings above are right and the primary's slot is a failover slot"
        )),
    }
    Ok(Some(gaps))
}

/// Standby decoding: what keeps the slot on the standby valid. Without `hot_standby_feedback`
/// (and a physical slot) the primary may vacuum catalog rows the slot still needs, and the
/// standby then invalidates the slot: a lost slot, found at the next start.
pub async fn decoding_standby_findings(client: &Client, server: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut say = |message: String| out.push(Finding { server: server.to_string(), message });
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('hot_standby_feedback'), current_setting('primary_slot_name')",
            &[],
        )
        .await;
    match row {
        Err(e) => say(format!("cannot read the standby's settings: {}", pg_error_text(&e))),
        Ok(r) => {
            let (in_recovery, feedback, primary_slot): (bool, String, String) = (r.get(0), r.get(1), r.get(2));
            if !in_recovery {
                say("standby_url is not in recovery (promoted?): decoding goes on from its slot, but heartbeats and watermarks go to the writer of url".into());
            } else {
                if feedback != "on" {
                    say("hot_standby_feedback is off: the primary may remove catalog rows the slot on this standby still needs, which invalidates the slot; set hot_standby_feedback = on".into());
                }
                if primary_slot.is_empty() {
                    say("primary_slot_name is empty: without a physical slot the primary does not keep the WAL and catalog rows this standby (and its logical slot) still need; set primary_slot_name".into());
                }
            }
        }
    }
    out
}
