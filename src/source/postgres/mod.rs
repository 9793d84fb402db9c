//! PostgreSQL / Aurora PostgreSQL source: streaming logical replication with the built-in
//! `pgoutput` plugin (no server extension, works on Aurora with `rds.logical_replication=1`).
//!
//! Two connections: a normal one (tokio-postgres) for checks, slot/publication management,
//! heartbeats and slot-lag readings, and a replication connection ([`replication`]) for the
//! stream. The slot's `confirmed_flush_lsn` is the checkpoint: it advances only through the
//! acknowledgement window, so a restart (or crash) resumes at the first change some sink had
//! not applied.

pub mod config;
pub mod consumer;
pub mod decode;
pub mod failover;
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

use super::{OnlineReport, SourceError};
use crate::change::Name;
use crate::change::matcher::RelationPattern;
use crate::source::{Output, RunContext, Source, SourceAdmin, SourceConfig, SourceEnv, SourceNeeds};
use crate::telemetry::{Health, metrics};

/// A configured PostgreSQL source, checked and ready to stream.
pub struct PostgresSource {
    name: Name,
    cfg: PostgresSourceConfig,
    info: ConnInfo,
    /// With standby decoding: the standby the slot lives on and the stream decodes from.
    standby: Option<ConnInfo>,
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
    standby: Option<ConnInfo>,
    catalog: Arc<ArcSwap<Catalog>>,
    pipelines: SnapshotPipelines,
    state_dir: std::path::PathBuf,
}

/// This source's pipeline names, as the slot's consumer record lists them.
fn pipeline_names(needs: &SourceNeeds) -> Vec<String> {
    needs.snapshots.iter().map(|(n, _, _)| n.to_string()).collect()
}

impl SourceAdmin for PgAdmin {
    fn recheck<'a>(&'a self, needs: &'a SourceNeeds) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let mut tables = needs.tables.clone();
            tables.extend(self.cfg.tables.iter().cloned());
            let client = setup::connect_sql(&self.info, &self.name).await?;
            let standby = match &self.standby {
                Some(s) => Some((setup::connect_sql(s, &self.name).await?, s)),
                None => None,
            };
            let catalog = setup::prepare(
                &client,
                &self.name,
                &self.cfg,
                &self.info,
                setup::Wanted { tables: &tables, sites: &needs.table_sites },
                false,
                standby.as_ref().map(|(c, s)| (c, *s)),
            )
            .await?;
            setup::check_columns(&catalog, &needs.columns)
                .map_err(|msg| SourceError::Setup { source_name: self.name.to_string(), msg })?;
            consumer::claim(&client, &self.name, &self.cfg, &self.state_dir, &pipeline_names(needs)).await?;
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
        let setup_err = |msg: String| SourceError::Setup { source_name: name.into(), msg };
        let standby = cfg.standby_info(name, &info).map_err(|e| setup_err(e.to_string()))?;
        let client = setup::connect_sql(&info, name).await?;
        setup::preflight(&client, name, &info).await?;
        let standby_client = match &standby {
            Some(s) => {
                let c = setup::connect_sql(s, name).await?;
                setup::preflight(&c, name, s).await?;
                let version: u32 = c
                    .query_one("SHOW server_version_num", &[])
                    .await
                    .map_err(|e| setup_err(setup::pg_error_text(&e)))?
                    .get::<_, String>(0)
                    .parse()
                    .unwrap_or(0);
                if version < 160_000 {
                    return Err(setup_err(format!(
                        "standby_url: {} runs PostgreSQL {}; decoding on a standby needs 16 or later",
                        s.endpoint(),
                        version / 10_000
                    )));
                }
                Some(c)
            }
            None => None,
        };
        // The server the slot lives on: the writer, or the standby it decodes from.
        let (slot_client, slot_info) = match (&standby_client, &standby) {
            (Some(c), Some(s)) => (c, s),
            _ => (&client, &info),
        };
        // Before anything creates a slot: is the slot still the one polysync streamed from?
        let start = origin::check(slot_client, slot_info, name, cfg, &env.state_dir).await?;
        if let origin::Start::Resnapshot(origin::Lost::SlotInvalidated { .. }) = &start {
            // An invalidated slot cannot stream: a new one replaces it.
            slot_client
                .execute("SELECT pg_drop_replication_slot($1)", &[&cfg.slot])
                .await
                .map_err(|e| setup_err(setup::pg_error_text(&e)))?;
        }
        let resnapshot = matches!(start, origin::Start::Resnapshot(_));
        let catalog = setup::prepare(
            &client,
            name,
            cfg,
            &info,
            setup::Wanted { tables: &tables, sites: &needs.table_sites },
            resnapshot,
            standby_client.as_ref().zip(standby.as_ref()),
        )
        .await?;
        setup::check_columns(&catalog, &needs.columns).map_err(setup_err)?;
        consumer::claim(&client, name, cfg, &env.state_dir, &pipeline_names(needs)).await?;
        if resnapshot {
            request_resnapshot(name, &catalog, needs, &env.state_dir).map_err(setup_err)?;
        }
        let gaps = match &standby_client {
            Some(c) => failover::decoding_standby_findings(c, &slot_info.endpoint()).await,
            None => {
                let fix = if cfg.create_if_missing { failover::SlotFix::Convert } else { failover::SlotFix::Report };
                failover_gaps(&client, &info, cfg, catalog.server_version, fix).await
            }
        };
        metrics().pg_failover_gaps.with_label_values(&[name]).set(gaps.len() as i64);
        for gap in gaps {
            tracing::warn!(source = name, slot = %cfg.slot, "failover readiness: {gap}");
        }
        let recorder =
            Arc::new(origin::Recorder::begin(slot_client, slot_info, name, &cfg.slot, &env.state_dir).await?);
        Ok(PostgresSource {
            name: Name::from(name),
            cfg: cfg.clone(),
            info,
            standby,
            catalog: Arc::new(ArcSwap::from_pointee(catalog)),
            pipelines: Arc::new(ArcSwap::from_pointee(needs.snapshots.clone())),
            state_dir: env.state_dir.clone(),
            max_in_flight: env.max_in_flight,
            recorder,
        })
    }
}

/// Every gap in the slot's failover readiness (the writer's settings and each standby's among
/// `hosts`). Reading them never stops a start: a server
/// without standbys is not wrong, only not highly available.
pub async fn failover_gaps(
    client: &tokio_postgres::Client,
    info: &ConnInfo,
    cfg: &PostgresSourceConfig,
    server_version: u32,
    fix: failover::SlotFix,
) -> Vec<failover::Finding> {
    let mut gaps = match failover::writer_findings(client, info, &cfg.slot, server_version, fix).await {
        Ok(g) => g,
        Err(e) => vec![failover::Finding {
            server: info.endpoint(),
            message: format!("cannot read the failover settings: {e}"),
        }],
    };
    gaps.extend(failover::standby_findings(info, &cfg.slot, server_version).await);
    gaps
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
            standby: self.standby.clone(),
            catalog: Arc::clone(&self.catalog),
            pipelines: Arc::clone(&self.pipelines),
            state_dir: self.state_dir.clone(),
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
        let partition = output.partition(&self.name, self.max_in_flight, 0, None);
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
                slot_info: self.standby.clone(),
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
        // The server the last stream ran on, to say when a failover moved it.
        let mut writer: Option<String> = None;
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
            let started = async {
                let mut conn = ReplConnection::connect(self.standby.as_ref().unwrap_or(&self.info)).await?;
                let identity = conn.simple_query("IDENTIFY_SYSTEM").await?;
                Ok::<_, replication::ReplError>((conn, identity))
            }
            .await;
            let started = match started {
                Ok((conn, identity)) => match self.follow_server(&conn, &identity, &mut writer).await {
                    Ok(()) => conn.start_logical(&self.cfg.slot, 0, &options).await,
                    Err(msg) => {
                        conn.close().await;
                        health.set(&component, Err(msg.clone()));
                        break Err(SourceError::Stream { source_name: self.name.to_string(), msg });
                    }
                },
                Err(e) => Err(e),
            };
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
                        // The slot was dropped while polysync ran, or a failover reached a
                        // server without a copy of it: never recreated silently here.
                        msg.push_str(&format!(
                            "; the slot does not exist on this server (dropped while streaming, or a failover to a server it was not synchronised to): the next start finds it lost and applies on_slot_lost = \"{}\"",
                            match self.cfg.on_slot_lost {
                                config::OnSlotLost::Stop => "stop",
                                config::OnSlotLost::Resnapshot => "resnapshot",
                            }
                        ));
                        metrics().pg_slot_lost.with_label_values(&[&self.name, "slot_missing"]).inc();
                        tracing::error!(source = %self.name, slot = %self.cfg.slot, "{msg}");
                    }
                    health.set(&component, Err(msg.clone()));
                    break Err(SourceError::Stream { source_name: self.name.to_string(), msg });
                }
            };
            tracing::info!(source = %self.name, endpoint = %writer.as_deref().unwrap_or_default(), slot = %self.cfg.slot, "streaming");
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

impl PostgresSource {
    /// After a (re)connect: is this still the system polysync streamed from? A new timeline is
    /// a failover to a promoted standby (logged, counted, recorded; the stream resumes from the
    /// slot synchronised to it); another system identifier stops the source, since positions
    /// and versions of two systems are not comparable.
    async fn follow_server(
        &self,
        conn: &ReplConnection,
        identity: &[Vec<Option<String>>],
        writer: &mut Option<String>,
    ) -> Result<(), String> {
        let field = |i: usize| identity.first().and_then(|r| r.get(i)).cloned().flatten().unwrap_or_default();
        let here = conn.endpoint().to_string();
        let timeline =
            field(1).parse::<u32>().map_err(|_| format!("{here}: IDENTIFY_SYSTEM: timeline {:?}", field(1)))?;
        match self.recorder.observe(&field(0), timeline).await {
            Ok(origin::Observed::Same) => {}
            Ok(origin::Observed::NewTimeline { from, to }) => {
                metrics().pg_timeline_changes.with_label_values(&[&self.name]).inc();
                tracing::warn!(source = %self.name, endpoint = %here, previous = writer.as_deref().unwrap_or("-"), from_timeline = from, to_timeline = to, slot = %self.cfg.slot, "failover: the writer is a promoted standby on a new timeline; streaming resumes from its copy of the slot, if it has one (changes after the copy's position replay)");
            }
            Err(lost) => {
                metrics().pg_slot_lost.with_label_values(&[&self.name, lost.label()]).inc();
                let msg = format!("{here}: {lost}; streaming stops, as positions of two systems are not comparable");
                tracing::error!(source = %self.name, reason = lost.label(), "{msg}");
                return Err(msg);
            }
        }
        if writer.as_deref().is_some_and(|w| w != here) {
            tracing::warn!(source = %self.name, from = writer.as_deref().unwrap_or_default(), to = %here, "the writer moved to another server");
        }
        *writer = Some(here);
        Ok(())
    }
}

/// What the maintenance task of a source needs.
struct Maintenance {
    name: String,
    /// The writer: heartbeats.
    info: ConnInfo,
    /// With standby decoding, the standby: slot lag and the lag-limit drop.
    slot_info: Option<ConnInfo>,
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
    let mut standby_client: Option<tokio_postgres::Client> = None;
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
        if !beat && let Some(standby) = &m.slot_info {
            // Standby decoding: the slot and its lag are on the standby.
            if standby_client.as_ref().is_none_or(|c| c.is_closed()) {
                standby_client = setup::connect_sql(standby, &name).await.ok();
            }
        }
        let c = match (&m.slot_info, beat) {
            (Some(_), false) => standby_client.as_ref(),
            _ => client.as_ref(),
        };
        let Some(c) = c else { continue };
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
                    "SELECT ((CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END) - confirmed_flush_lsn)::bigint \
                     FROM pg_replication_slots WHERE slot_name = $1",
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
                Err(_) if m.slot_info.is_some() => standby_client = None,
                Err(_) => client = None,
            }
        }
    }
}

/// The read-only part of a start, for `check --online`: reach the writer (and the standby of
/// standby decoding), the privileges and `wal_level`, the slot against polysync's record, and
/// failover readiness. Nothing is created or changed; an error is what `run` would refuse with.
pub async fn check_online(
    name: &str,
    cfg: &PostgresSourceConfig,
    needs: &SourceNeeds,
    state_dir: &std::path::Path,
) -> Result<OnlineReport, SourceError> {
    let setup_err = |msg: String| SourceError::Setup { source_name: name.into(), msg };
    let info = cfg.validate(name).map_err(|e| setup_err(e.to_string()))?;
    let standby = cfg.standby_info(name, &info).map_err(|e| setup_err(e.to_string()))?;
    let mut report = OnlineReport::default();
    let client = setup::connect_sql(&info, name).await?;
    setup::preflight(&client, name, &info).await?;
    let row = client
        .query_one(
            "SELECT coalesce(host(inet_server_addr()), 'local socket'), coalesce(inet_server_port(), 0), current_setting('server_version_num')::int",
            &[],
        )
        .await
        .map_err(|e| setup_err(setup::pg_error_text(&e)))?;
    let (addr, port, version): (String, i32, i32) = (row.get(0), row.get(1), row.get(2));
    report.facts.push(format!(
        "writer {addr}:{port} (PostgreSQL {}), wal_level logical, role {} may stream",
        version / 10_000,
        info.user
    ));
    // Tables, publication, keys and columns, as a start checks them (nothing created).
    let mut tables = needs.tables.clone();
    tables.extend(cfg.tables.iter().cloned());
    let (catalog, planned) =
        setup::inspect(&client, name, cfg, &info, setup::Wanted { tables: &tables, sites: &needs.table_sites }).await?;
    setup::check_columns(&catalog, &needs.columns).map_err(setup_err)?;
    report.facts.push(format!(
        "publication {:?}: tables {} exist with keys; the columns the pipelines name exist",
        cfg.publication,
        if tables.is_empty() {
            "(none named)".to_string()
        } else {
            tables.iter().cloned().collect::<Vec<_>>().join(", ")
        }
    ));
    report.facts.extend(planned);
    let standby_client = match &standby {
        Some(s) => {
            let c = setup::connect_sql(s, name).await?;
            setup::preflight(&c, name, s).await?;
            report.facts.push(format!("decoding on standby {}", s.endpoint()));
            Some(c)
        }
        None => None,
    };
    let (slot_client, slot_info) = match (&standby_client, &standby) {
        (Some(c), Some(s)) => (c, s),
        _ => (&client, &info),
    };
    let path = crate::checkpoint::origin::origin_path(state_dir, name);
    let record = crate::checkpoint::origin::OriginRecord::load(&path).map_err(|e| setup_err(e.to_string()))?;
    let facts = origin::server_facts(slot_client, slot_info, name, &cfg.slot).await?;
    match (origin::judge(record.as_ref(), &facts, &cfg.slot), &facts.slot) {
        (origin::Verdict::First, None) if cfg.create_if_missing => {
            report.facts.push(format!("slot {:?} does not exist yet: the first start creates it", cfg.slot))
        }
        (origin::Verdict::First, None) => {
            return Err(setup_err(format!(
                "replication slot {:?} does not exist on {}; create it or set create_if_missing = true",
                cfg.slot,
                slot_info.endpoint()
            )));
        }
        (origin::Verdict::First, Some(_)) => {
            report.facts.push(format!("slot {:?} exists; no record yet in {}", cfg.slot, path.display()))
        }
        (origin::Verdict::Same, _) => {
            report.facts.push(format!("slot {:?} is the one polysync streamed from ({})", cfg.slot, path.display()))
        }
        (origin::Verdict::Promoted { from, to }, _) => report.facts.push(format!(
            "slot {:?} was synchronised to this promoted standby (timeline {from} → {to}): the start resumes from it",
            cfg.slot
        )),
        (origin::Verdict::Lost(lost), _) => match (cfg.on_slot_lost, &lost) {
            (config::OnSlotLost::Resnapshot, l) if !matches!(l, origin::Lost::OtherSystem { .. }) => {
                report.warnings.push(format!(
                    "{lost}; on_slot_lost = \"resnapshot\": the start re-reads every table of every pipeline"
                ))
            }
            _ => return Err(setup_err(format!("{lost} (on_slot_lost decides at start; see docs/failover.md)"))),
        },
    }
    let gaps = match &standby_client {
        Some(c) => failover::decoding_standby_findings(c, &slot_info.endpoint()).await,
        None => {
            // Read-only: the slot is not converted here, only reported.
            let fix = if cfg.create_if_missing { failover::SlotFix::AtStart } else { failover::SlotFix::Report };
            failover_gaps(&client, &info, cfg, version as u32, fix).await
        }
    };
    report.warnings.extend(gaps.iter().map(|g| format!("failover readiness: {g}")));
    Ok(report)
}
