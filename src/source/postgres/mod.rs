//! PostgreSQL / Aurora PostgreSQL source: streaming logical replication with the built-in
//! `pgoutput` plugin (no server extension, works on Aurora with `rds.logical_replication=1`).
//!
//! Two connections: a normal one (tokio-postgres) for checks, slot/publication management,
//! heartbeats and slot-lag readings, and a replication connection ([`replication`]) for the
//! stream. The slot's `confirmed_flush_lsn` is the checkpoint: it advances only through the
//! acknowledgement window, so a restart (or crash) resumes at the first change some sink had
//! not applied.

pub mod config;
pub mod decode;
pub mod origin;
pub mod replication;
pub mod schema_change;
pub mod setup;
pub mod snapshot;
pub mod stream;
pub mod types;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

pub use config::{ConnInfo, PostgresSourceConfig};
use replication::ReplConnection;
use setup::Catalog;
use stream::{Session, StreamEnd};

use futures::future::BoxFuture;

use super::SourceError;
use crate::change::Name;
use crate::change::matcher::RelationPattern;
use crate::source::{Output, RunContext, Source, SourceAdmin, SourceConfig, SourceEnv, SourceNeeds};
use crate::telemetry::{Health, metrics};

/// A configured PostgreSQL source, checked and ready to stream.
pub struct PostgresSource {
    name: Name,
    cfg: PostgresSourceConfig,
    info: ConnInfo,
    catalog: Arc<ArcSwap<Catalog>>,
    /// The pipelines snapshots may serve; a reload replaces the list, so a pipeline added by
    /// reload can be snapshotted at once.
    pipelines: SnapshotPipelines,
    state_dir: std::path::PathBuf,
    max_in_flight: usize,
    /// Where the source streams from, kept on disk ahead of every confirmation.
    recorder: Arc<origin::Recorder>,
}

/// Pipelines of a source as snapshots see them: name, relations, `snapshot = "initial"`.
pub type SnapshotPipelines = Arc<ArcSwap<Vec<(Name, Vec<RelationPattern>, bool)>>>;

/// What a reload needs to check a source for new pipelines: a fresh SQL connection runs the
/// same start-up checks (adding tables to the publication when allowed) and refreshes the
/// catalog the stream reads primary keys and type names from.
#[derive(Clone)]
pub struct PgAdmin {
    name: Name,
    cfg: PostgresSourceConfig,
    info: ConnInfo,
    catalog: Arc<ArcSwap<Catalog>>,
    pipelines: SnapshotPipelines,
}

impl SourceAdmin for PgAdmin {
    fn recheck<'a>(&'a self, needs: &'a SourceNeeds) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let mut tables = needs.tables.clone();
            tables.extend(self.cfg.tables.iter().cloned());
            let client = setup::connect_sql(&self.info, &self.name).await?;
            let catalog = setup::prepare(&client, &self.name, &self.cfg, &self.info, &tables, false).await?;
            setup::check_columns(&catalog, &needs.columns)
                .map_err(|msg| SourceError::Setup { source_name: self.name.to_string(), msg })?;
            self.catalog.store(Arc::new(catalog));
            self.pipelines.store(Arc::new(needs.snapshots.clone()));
            Ok(())
        })
    }

    fn same_config(&self, cfg: &SourceConfig) -> bool {
        matches!(cfg, SourceConfig::Postgres(c) if *c == self.cfg)
    }
}

impl PostgresSource {
    /// Connect the SQL connection and run every start-up check (creating publication and
    /// slot when allowed) for what the pipelines need.
    pub async fn prepare(
        name: &str,
        cfg: &PostgresSourceConfig,
        needs: &SourceNeeds,
        env: &SourceEnv,
    ) -> Result<PostgresSource, SourceError> {
        let info =
            cfg.validate(name).map_err(|e| SourceError::Setup { source_name: name.into(), msg: e.to_string() })?;
        let mut tables = needs.tables.clone();
        tables.extend(cfg.tables.iter().cloned());
        let client = setup::connect_sql(&info, name).await?;
        setup::preflight(&client, name, &info).await?;
        // Before anything creates a slot: is the slot still the one polysync streamed from?
        let start = origin::check(&client, &info, name, cfg, &env.state_dir).await?;
        if let origin::Start::Resnapshot(origin::Lost::SlotInvalidated { .. }) = &start {
            // An invalidated slot cannot stream: a new one replaces it.
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&cfg.slot])
                .await
                .map_err(|e| SourceError::Setup { source_name: name.into(), msg: setup::pg_error_text(&e) })?;
        }
        let resnapshot = matches!(start, origin::Start::Resnapshot(_));
        let catalog = setup::prepare(&client, name, cfg, &info, &tables, resnapshot).await?;
        setup::check_columns(&catalog, &needs.columns)
            .map_err(|msg| SourceError::Setup { source_name: name.into(), msg })?;
        if resnapshot {
            request_resnapshot(name, &catalog, needs, &env.state_dir)
                .map_err(|msg| SourceError::Setup { source_name: name.into(), msg })?;
        }
        let recorder = Arc::new(origin::Recorder::begin(&client, &info, name, &cfg.slot, &env.state_dir).await?);
        Ok(PostgresSource {
            name: Name::from(name),
            cfg: cfg.clone(),
            info,
            catalog: Arc::new(ArcSwap::from_pointee(catalog)),
            pipelines: Arc::new(ArcSwap::from_pointee(needs.snapshots.clone())),
            state_dir: env.state_dir.clone(),
            max_in_flight: env.max_in_flight,
            recorder,
        })
    }
}

/// `on_slot_lost = "resnapshot"`: every published table of every pipeline of the source is
/// read again, cleared in that pipeline's sinks first.
fn request_resnapshot(
    source: &str,
    catalog: &Catalog,
    needs: &SourceNeeds,
    state_dir: &std::path::Path,
) -> Result<(), String> {
    use crate::checkpoint::snapshot::{SnapshotProgress, SnapshotTask, progress_path};
    let path = progress_path(state_dir, source);
    let mut progress = SnapshotProgress::load(&path).map_err(|e| e.to_string())?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let mut n = 0;
    for (pipeline, rels, _) in &needs.snapshots {
        for t in catalog
            .published
            .iter()
            .filter(|t| rels.iter().any(|r| r.matches(t)) && Some(*t) != catalog.signal_table.as_ref())
        {
            let mut task = SnapshotTask::new(format!("resnapshot:{stamp}:{pipeline}:{t}"), pipeline, t, None);
            task.clear_first = true;
            n += progress.add(task) as usize;
        }
    }
    progress.save(&path).map_err(|e| e.to_string())?;
    tracing::warn!(source, tables = n, "re-reading every table of every pipeline after the lost slot");
    Ok(())
}

impl Source for PostgresSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn admin(&self) -> Arc<dyn SourceAdmin> {
        Arc::new(PgAdmin {
            name: Arc::clone(&self.name),
            cfg: self.cfg.clone(),
            info: self.info.clone(),
            catalog: Arc::clone(&self.catalog),
            pipelines: Arc::clone(&self.pipelines),
        })
    }

    fn run(self: Box<Self>, ctx: RunContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(self.stream(ctx.output, ctx.health, ctx.cancel, ctx.hard_stop))
    }
}

impl PostgresSource {
    /// Stream until `cancel`; reconnect with backoff after failures. Returns an error only for
    /// problems a reconnect cannot fix (authentication, a dropped slot).
    async fn stream(
        self,
        output: Arc<dyn Output>,
        health: Arc<Health>,
        cancel: CancellationToken,
        hard_stop: CancellationToken,
    ) -> Result<(), SourceError> {
        let component = format!("source {}", self.name);
        let partition = output.partition(&self.name, self.max_in_flight, 0);
        let connected = metrics().source_connected.with_label_values(&[&self.name]);
        let reconnects = metrics().source_reconnects.with_label_values(&[&self.name]);
        let dropped: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        // Cancelled with the daemon's hard stop, or when the slot is dropped at the lag limit
        // (then nothing in flight can be confirmed any more, so the stream stops at once).
        let abort = hard_stop.child_token();
        let maintenance = tokio::spawn(maintenance(
            Maintenance {
                name: self.name.to_string(),
                info: self.info.clone(),
                slot: self.cfg.slot.clone(),
                heartbeat: self.cfg.heartbeat_interval(),
                lag_limit: self.cfg.slot_lag_limit.map(|b| b.0),
                on_limit: self.cfg.on_slot_lag_limit,
                recorder: Arc::clone(&self.recorder),
                dropped: Arc::clone(&dropped),
                abort: abort.clone(),
            },
            cancel.clone(),
        ));
        let new_backoff = || crate::retry::backoff_between(Duration::from_millis(200), self.cfg.reconnect_max_delay());
        let mut delays = new_backoff();
        let publication = self.cfg.publication.clone();
        let mut options = vec![("proto_version", "1"), ("publication_names", publication.as_str())];
        // Logical messages carry the snapshot watermarks (pgoutput supports them from 14).
        let coordinator = Arc::new(snapshot::Coordinator::default());
        let schema_log =
            Arc::new(schema_change::SchemaLog::load(schema_change::schema_path(&self.state_dir, &self.name)));
        schema_log.baseline(self.catalog.load().shapes.iter());
        let snapshots = match self.catalog.load().server_version >= 140000 {
            true => {
                options.push(("messages", "true"));
                let manager = snapshot::Manager {
                    source: Arc::clone(&self.name),
                    info: self.info.clone(),
                    catalog: Arc::clone(&self.catalog),
                    settings: self.cfg.snapshot.clone(),
                    state_dir: self.state_dir.clone(),
                    pipelines: Arc::clone(&self.pipelines),
                    partition: Arc::clone(&partition),
                    coordinator: Arc::clone(&coordinator),
                    cancel: cancel.clone(),
                };
                Some(tokio::spawn(manager.run()))
            }
            false => {
                if self.pipelines.load().iter().any(|p| p.2) {
                    tracing::error!(source = %self.name, "snapshot = \"initial\" needs PostgreSQL 14 or later (pgoutput messages carry the watermarks); no snapshot is taken");
                }
                None
            }
        };
        let result = loop {
            if cancel.is_cancelled() {
                break Ok(());
            }
            if let Some(msg) = dropped.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                health.set(&component, Err(msg.clone()));
                break Err(SourceError::Stream { source_name: self.name.to_string(), msg });
            }
            let started =
                async { ReplConnection::connect(&self.info).await?.start_logical(&self.cfg.slot, 0, &options).await }
                    .await;
            let mut stream = match started {
                Ok(s) => s,
                Err(e) if e.is_transient() => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(30));
                    health.set(&component, Err(format!("connecting: {e}")));
                    tracing::warn!(source = %self.name, error = %e, retry_in = ?delay, "replication connection failed; retrying");
                    reconnects.inc();
                    tokio::select! {
                        _ = cancel.cancelled() => break Ok(()),
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
                Err(e) => {
                    let mut msg = e.to_string();
                    if e.code() == Some("42704") {
                        // The slot was dropped while polysync ran: never recreated silently here.
                        msg.push_str(&format!(
                            "; the slot was dropped while streaming: the next start finds it lost and applies on_slot_lost = \"{}\"",
                            match self.cfg.on_slot_lost {
                                config::OnSlotLost::Stop => "stop",
                                config::OnSlotLost::Resnapshot => "resnapshot",
                            }
                        ));
                    }
                    health.set(&component, Err(msg.clone()));
                    break Err(SourceError::Stream { source_name: self.name.to_string(), msg });
                }
            };
            tracing::info!(source = %self.name, endpoint = %self.info.endpoint(), slot = %self.cfg.slot, "streaming");
            health.set(&component, Ok(()));
            connected.set(1);
            delays = new_backoff();
            let mut session = Session::new(Arc::clone(&self.name), Arc::clone(&self.catalog), Arc::clone(&coordinator))
                .with_schema_watch(stream::SchemaWatch {
                    log: Arc::clone(&schema_log),
                    policy: self.cfg.on_column_change,
                    can_reread: snapshots.is_some(),
                });
            let end = stream::run_session(
                &mut session,
                &mut stream,
                &*partition,
                self.cfg.status_interval(),
                &self.recorder,
                &cancel,
                &abort,
            )
            .await;
            connected.set(0);
            if let Some(msg) = dropped.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                health.set(&component, Err(msg.clone()));
                break Err(SourceError::Stream { source_name: self.name.to_string(), msg });
            }
            match end {
                StreamEnd::Stopped => {
                    stream.close().await;
                    break Ok(());
                }
                StreamEnd::Failed(e) if e.is_transient() => {
                    health.set(&component, Err(format!("stream lost: {e}")));
                    tracing::warn!(source = %self.name, error = %e, "replication stream lost; reconnecting (unconfirmed changes replay)");
                }
                StreamEnd::Failed(e) => {
                    health.set(&component, Err(e.to_string()));
                    break Err(SourceError::Stream { source_name: self.name.to_string(), msg: e.to_string() });
                }
                StreamEnd::Corrupt(msg) => {
                    health.set(&component, Err(msg.clone()));
                    tracing::error!(source = %self.name, error = %msg, "could not interpret the replication stream; reconnecting from the last confirmed position");
                    stream.close().await;
                }
            }
            reconnects.inc();
            let delay = delays.next().unwrap_or(Duration::from_secs(30));
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        };
        if dropped.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            // Let it finish dropping the slot (it waits for the walsender to go away).
            let _ = tokio::time::timeout(Duration::from_secs(15), maintenance).await;
        } else {
            maintenance.abort();
        }
        if let Some(s) = snapshots {
            s.abort();
        }
        result
    }
}

/// What the maintenance task of a source needs.
struct Maintenance {
    name: String,
    info: ConnInfo,
    slot: String,
    heartbeat: Duration,
    lag_limit: Option<u64>,
    on_limit: config::OnSlotLagLimit,
    /// Told when the slot is dropped at the lag limit, so the next start knows it was lost.
    recorder: Arc<origin::Recorder>,
    /// Set (with the reason) when the slot was dropped at the lag limit: the stream stops.
    dropped: Arc<std::sync::Mutex<Option<String>>>,
    /// Stops the stream at once (it may be waiting for full lanes of a stuck sink).
    abort: CancellationToken,
}

/// Past the lag limit with `on_slot_lag_limit = "drop_slot"`: stop the stream and drop the
/// slot (the server frees its WAL at once). The record says polysync dropped it, so the next
/// start treats the slot as lost and `on_slot_lost` decides (never a silent new slot).
async fn drop_slot(m: &Maintenance, c: &tokio_postgres::Client, lag: i64) {
    let msg = format!(
        "replication slot {} was dropped: its lag of {lag} bytes crossed slot_lag_limit (on_slot_lag_limit = \"drop_slot\"); changes since its confirmed position are not in the sinks. The next start finds the slot lost and applies on_slot_lost",
        m.slot
    );
    tracing::error!(source = %m.name, slot = %m.slot, lag_bytes = lag, "{msg}");
    *m.dropped.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
    m.abort.cancel();
    if let Err(e) = m.recorder.dropped(&format!("its lag of {lag} bytes crossed slot_lag_limit")).await {
        tracing::error!(source = %m.name, error = %e, "cannot record that the slot was dropped");
    }
    for _ in 0..50 {
        let _ = c
            .execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL", &[&m.slot])
            .await;
        if c.execute("SELECT pg_drop_replication_slot($1)", &[&m.slot]).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Heartbeats (so an idle database's slot advances) and slot-lag readings, on the SQL
/// connection, reconnecting quietly when it drops.
async fn maintenance(m: Maintenance, cancel: CancellationToken) {
    let (name, info, slot, heartbeat) = (m.name.clone(), m.info.clone(), m.slot.clone(), m.heartbeat);
    let lag_gauge = metrics().pg_slot_lag.with_label_values(&[&name, &slot]);
    let exceeded = metrics().pg_slot_lag_exceeded.with_label_values(&[&name, &slot]);
    let mut over = false;
    let mut client: Option<tokio_postgres::Client> = None;
    let mut heartbeat_tick = tokio::time::interval(heartbeat);
    let mut lag_tick = tokio::time::interval(Duration::from_secs(5));
    let mut heartbeat_enabled = true;
    loop {
        let beat = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = heartbeat_tick.tick() => true,
            _ = lag_tick.tick() => false,
        };
        if beat && !heartbeat_enabled {
            continue;
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = setup::connect_sql(&info, &name).await.ok();
        }
        let Some(c) = &client else { continue };
        if beat {
            if let Err(e) = c.execute("SELECT pg_logical_emit_message(false, 'polysync.heartbeat', '')", &[]).await {
                if e.code().map(|c| c.code()) == Some("42501") {
                    heartbeat_enabled = false;
                    tracing::warn!(source = %name, "heartbeat disabled: the role may not call pg_logical_emit_message ({}); an idle database's slot then advances only with other WAL traffic", setup::pg_error_text(&e));
                } else {
                    client = None;
                }
            }
        } else {
            match c
                .query_opt(
                    "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
            {
                Ok(Some(row)) => {
                    let lag = row.get::<_, Option<i64>>(0).unwrap_or(0);
                    lag_gauge.set(lag);
                    let now_over = m.lag_limit.is_some_and(|l| lag > l as i64);
                    exceeded.set(now_over as i64);
                    if now_over && !over {
                        tracing::error!(source = %name, slot = %slot, lag_bytes = lag, limit_bytes = m.lag_limit, "replication slot lag crossed slot_lag_limit: the server keeps this much WAL for polysync (a sink is down or slow, or polysync is behind)");
                        if m.on_limit == config::OnSlotLagLimit::DropSlot {
                            drop_slot(&m, c, lag).await;
                            return;
                        }
                    } else if over && !now_over {
                        tracing::info!(source = %name, slot = %slot, lag_bytes = lag, "replication slot lag back under slot_lag_limit");
                    }
                    over = now_over;
                }
                Ok(None) => tracing::error!(source = %name, slot = %slot, "replication slot no longer exists"),
                Err(_) => client = None,
            }
        }
    }
}
