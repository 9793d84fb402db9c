//! Sink lanes: batch records, write them, retry what failed, dead-letter what was refused, and
//! acknowledge — in one place for every sink kind, so the delivery policy cannot drift.
//!
//! Each sink has one lane per pipeline lane; a change's records always travel through the lane
//! of its key, so order per key holds end to end. Lane queues are bounded: a slow sink fills its
//! queues, then the pipeline lanes wait, then the source's acknowledgement window fills and the
//! source stops reading. Retries back off exponentially with jitter and never give up: data is
//! never dropped, the sink is reported unready instead. Only the shutdown deadline abandons
//! work, and abandoned work is not acknowledged, so it replays after restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ItemOutcome, Record, Sink, SinkConfig};
use crate::change::Name;
use crate::dlq::{DeadLetter, DeadLetterQueue};
use crate::telemetry::{Health, metrics};

/// How often an idle sink is probed for readiness.
const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// A running sink target with its lanes.
pub struct SinkHandle {
    /// Target name.
    pub name: Name,
    /// The config it was built from (reload keeps a sink whose config is unchanged).
    pub config: SinkConfig,
    /// Lane inputs; record for lane `i` goes to `lanes[i % len]`.
    pub lanes: Vec<mpsc::Sender<Record>>,
    /// Lane and checker tasks.
    pub tasks: TaskTracker,
    /// Stops the readiness checker when the handle is dropped.
    checker: CancellationToken,
}

impl Drop for SinkHandle {
    fn drop(&mut self) {
        self.checker.cancel();
    }
}

/// Shared things every lane needs.
#[derive(Clone)]
pub struct LaneContext {
    /// Where refused records go.
    pub dlq: Arc<DeadLetterQueue>,
    /// Readiness registry.
    pub health: Arc<Health>,
    /// Cancelled when the shutdown deadline passes: abandon (do not acknowledge) work.
    pub hard_stop: CancellationToken,
}

/// Start `lanes` lanes for a built sink.
pub fn start(
    name: &str,
    config: SinkConfig,
    sink: Arc<dyn Sink>,
    lanes: usize,
    capacity: usize,
    ctx: LaneContext,
) -> SinkHandle {
    let tasks = TaskTracker::new();
    let mut senders = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let (tx, rx) = mpsc::channel(capacity);
        senders.push(tx);
        tasks.spawn(run_lane(Arc::clone(&sink), rx, ctx.clone()));
    }
    let checker = CancellationToken::new();
    {
        let sink = Arc::clone(&sink);
        let health = Arc::clone(&ctx.health);
        let stop = checker.clone();
        let component = format!("sink {name}");
        tasks.spawn(async move {
            loop {
                let r = tokio::select! {
                    _ = stop.cancelled() => break,
                    r = tokio::time::timeout(CHECK_INTERVAL, sink.check()) => r,
                };
                let state = match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.msg),
                    Err(_) => Err(format!("no answer within {CHECK_INTERVAL:?}")),
                };
                metrics().sink_up.with_label_values(&[sink.name()]).set(i64::from(state.is_ok()));
                health.set(&component, state);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(CHECK_INTERVAL) => {}
                }
            }
            health.remove(&component);
        });
    }
    tasks.close();
    SinkHandle { name: Name::from(name), config, lanes: senders, tasks, checker }
}

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(30))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Sleep, or return false if the hard stop fires first.
async fn pause(d: Duration, hard_stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = hard_stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

async fn run_lane(sink: Arc<dyn Sink>, mut rx: mpsc::Receiver<Record>, ctx: LaneContext) {
    let limits = sink.limits();
    let max = limits.max_records.max(1);
    let mut buf: Vec<Record> = Vec::with_capacity(max);
    let mut lags: HashMap<Name, prometheus::Histogram> = HashMap::new();
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut buf, max) => n,
            _ = ctx.hard_stop.cancelled() => return,
        };
        if n == 0 {
            return; // every sender is gone and the queue is empty: drained
        }
        if !limits.linger.is_zero() && buf.len() < max {
            let deadline = tokio::time::Instant::now() + limits.linger;
            while buf.len() < max {
                let room = max - buf.len();
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    n = rx.recv_many(&mut buf, room) => if n == 0 { break },
                }
            }
        }
        let batch = std::mem::replace(&mut buf, Vec::with_capacity(max));
        if !deliver(sink.as_ref(), batch, &ctx, &mut lags).await {
            return; // hard stop: abandoned records stay unacknowledged and replay
        }
    }
}

/// Write a batch until every record is applied or dead-lettered. Returns false on hard stop.
async fn deliver(
    sink: &dyn Sink,
    mut pending: Vec<Record>,
    ctx: &LaneContext,
    lags: &mut HashMap<Name, prometheus::Histogram>,
) -> bool {
    let m = metrics();
    let name = sink.name().to_string();
    let component = format!("sink {name}");
    let mut delays = backoff();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let started = Instant::now();
        let result = sink.write(&pending).await;
        tracing::trace!(sink = %name, records = pending.len(), ok = result.is_ok(), "sink write");
        m.sink_request_duration.with_label_values(&[&name]).observe(started.elapsed().as_secs_f64());
        m.sink_batch_size.with_label_values(&[&name]).observe(pending.len() as f64);
        let outcomes = match result {
            Ok(o) if o.len() == pending.len() => o,
            Ok(o) => {
                tracing::error!(sink = %name, expected = pending.len(), got = o.len(), "sink returned the wrong number of outcomes; retrying the batch");
                m.sink_errors.with_label_values(&[&name, "transient"]).inc();
                if !pause(delays.next().unwrap_or(Duration::from_secs(30)), &ctx.hard_stop).await {
                    return false;
                }
                continue;
            }
            Err(e) => {
                m.sink_errors.with_label_values(&[&name, "transient"]).inc();
                m.sink_retries.with_label_values(&[&name, "request"]).inc();
                m.sink_up.with_label_values(&[&name]).set(0);
                ctx.health.set(&component, Err(e.msg.clone()));
                let delay = delays.next().unwrap_or(Duration::from_secs(30));
                if attempt <= 3 || attempt.is_power_of_two() {
                    tracing::warn!(sink = %name, error = %e, attempt, records = pending.len(), retry_in = ?delay, "sink write failed; will retry");
                }
                if !pause(delay, &ctx.hard_stop).await {
                    return false;
                }
                continue;
            }
        };
        if attempt > 1 {
            tracing::info!(sink = %name, attempt, "sink write succeeded after retries");
        }
        m.sink_up.with_label_values(&[&name]).set(1);
        ctx.health.set(&component, Ok(()));
        let mut retry = Vec::new();
        let mut applied = 0u64;
        let now = Utc::now();
        for (rec, outcome) in pending.into_iter().zip(outcomes) {
            match outcome {
                ItemOutcome::Applied => {
                    applied += 1;
                    observe_lag(lags, &rec, now);
                    rec.ticket.ack();
                }
                ItemOutcome::Rejected(reason) => {
                    m.sink_errors.with_label_values(&[&name, "rejected"]).inc();
                    if !dead_letter(&rec, &name, &reason, ctx).await {
                        return false;
                    }
                    rec.ticket.ack();
                }
                ItemOutcome::Retry(reason) => {
                    m.sink_retries.with_label_values(&[&name, "item"]).inc();
                    if retry.is_empty() && (attempt <= 3 || attempt.is_power_of_two()) {
                        tracing::warn!(sink = %name, reason = %reason, relation = %rec.change.relation, key = %rec.change.key_display(), "sink refused an item for now; retrying it");
                    }
                    retry.push(rec);
                }
            }
        }
        if applied > 0 {
            m.sink_records.with_label_values(&[&name, "applied"]).inc_by(applied);
        }
        if retry.is_empty() {
            return true;
        }
        pending = retry;
        if !pause(delays.next().unwrap_or(Duration::from_secs(30)), &ctx.hard_stop).await {
            return false;
        }
    }
}

fn observe_lag(lags: &mut HashMap<Name, prometheus::Histogram>, rec: &Record, now: chrono::DateTime<Utc>) {
    if let Some(t) = rec.change.commit_time {
        let h = lags.entry(Arc::clone(&rec.pipeline)).or_insert_with(|| metrics().lag_for(&rec.pipeline));
        h.observe(((now - t).num_microseconds().unwrap_or(0).max(0) as f64) / 1e6);
    }
}

/// Record a refused item in the DLQ, retrying the write (disk full) until it succeeds or the
/// hard stop fires. Returns false on hard stop; the caller must then not acknowledge.
pub async fn dead_letter(rec: &Record, sink: &str, reason: &str, ctx: &LaneContext) -> bool {
    record_dead_letter(&ctx.dlq, &rec.pipeline, sink, reason, &rec.change, &ctx.hard_stop).await
}

/// Write one DLQ entry durably, retrying with backoff; false if the hard stop fired first.
pub async fn record_dead_letter(
    dlq: &DeadLetterQueue,
    pipeline: &str,
    sink: &str,
    reason: &str,
    change: &crate::change::Change,
    hard_stop: &CancellationToken,
) -> bool {
    let m = metrics();
    let mut delays = backoff();
    let mut logged = false;
    loop {
        let entry = DeadLetter { pipeline, sink, reason, change };
        match dlq.write(&entry) {
            Ok(()) => {
                m.dlq_entries.with_label_values(&[pipeline, sink]).inc();
                m.sink_records.with_label_values(&[sink, "dead_lettered"]).inc();
                m.dlq_bytes.set(dlq.total_bytes() as i64);
                tracing::warn!(pipeline, sink, relation = %change.relation, key = %change.key_display(), position = %change.position, reason, "change dead-lettered");
                return true;
            }
            Err(e) => {
                m.dlq_write_failures.inc();
                if !logged {
                    tracing::error!(pipeline, sink, error = %e, "cannot record a dead letter; this lane stops until it can (the change is not acknowledged)");
                    logged = true;
                }
                if !pause(delays.next().unwrap_or(Duration::from_secs(30)), hard_stop).await {
                    return false;
                }
            }
        }
    }
}
