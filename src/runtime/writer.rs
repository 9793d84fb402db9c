//! A sink's lane writers: take a batch from the sink's queue, write it with the sink currently
//! configured, and finish every record (applied, or dead-lettered) — in one place for every
//! sink kind, so the delivery policy cannot drift.
//!
//! Within a lane, batches are written one after another, so one key's records are applied in
//! order. A failed write is retried with the backoff the error policy gives its kind; while a
//! memory record waits too long the queue spills it to the spool (its ticket released) and the
//! writer leaves it to the spooled copy. A reload that changes the sink's config swaps the sink
//! under the writers: an attempt in flight is abandoned and the batch goes to the new target, so
//! nothing reaches the old one afterwards. Only the shutdown deadline abandons work, and
//! abandoned work is never acknowledged, so it replays after a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::policy::{self, Decision, Failure};
use super::queue::{SinkQueue, Take};
use super::record::Item;
use crate::change::{Change, Name};
use crate::dlq::{DeadLetter, DeadLetterQueue};
use crate::sink::{ItemOutcome, Record, Sink, SinkErrorKind};
use crate::telemetry::{Health, metrics};

/// The sink a target name currently writes to; a reload swaps it in place.
pub struct SinkSlot {
    current: ArcSwap<Current>,
    swapped: Notify,
}

/// One generation of a target's sink.
pub struct Current {
    /// The connected sink.
    pub sink: Arc<dyn Sink>,
    /// Bumped by every swap.
    pub generation: u64,
}

impl SinkSlot {
    /// A slot holding `sink`.
    pub fn new(sink: Arc<dyn Sink>) -> SinkSlot {
        SinkSlot { current: ArcSwap::from_pointee(Current { sink, generation: 0 }), swapped: Notify::new() }
    }

    /// The sink now.
    pub fn load(&self) -> Arc<Current> {
        self.current.load_full()
    }

    /// Replace the sink; writers abandon attempts on the old one and retry on this one.
    pub fn swap(&self, sink: Arc<dyn Sink>) {
        let generation = self.current.load().generation + 1;
        self.current.store(Arc::new(Current { sink, generation }));
        self.swapped.notify_waiters();
    }

    /// Resolves once the generation is newer than `generation`.
    async fn changed(&self, generation: u64) {
        loop {
            let n = self.swapped.notified();
            if self.current.load().generation != generation {
                return;
            }
            n.await;
        }
    }
}

/// What every writer of a sink shares.
#[derive(Clone)]
pub struct WriterContext {
    /// The queue it takes from.
    pub queue: Arc<SinkQueue>,
    /// The sink it writes with.
    pub slot: Arc<SinkSlot>,
    /// Where refused records go.
    pub dlq: Arc<DeadLetterQueue>,
    /// Readiness registry.
    pub health: Arc<Health>,
    /// Abandon work (the shutdown deadline passed).
    pub hard_stop: CancellationToken,
}

/// Run lane `lane` until the queue is closed and drained, or the hard stop fires.
pub async fn run(lane: usize, ctx: WriterContext) {
    let mut lags: HashMap<Name, prometheus::Histogram> = HashMap::new();
    loop {
        let limits = ctx.slot.load().sink.limits();
        let take = tokio::select! {
            t = ctx.queue.take(lane, limits.max_records.max(1), limits.linger) => t,
            _ = ctx.hard_stop.cancelled() => return,
        };
        let items = match take {
            Take::Batch(items) => items,
            Take::Barrier(item) => vec![item],
            Take::Closed => return,
        };
        if !deliver(&ctx, items, &mut lags).await {
            return;
        }
    }
}

/// Sleep, or false if the hard stop fires first; a sink swap cuts it short.
async fn pause(d: Duration, ctx: &WriterContext, generation: u64) -> bool {
    tokio::select! {
        _ = ctx.hard_stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
        _ = ctx.slot.changed(generation) => true,
    }
}

/// Write `items` until each is applied or dead-lettered. False on hard stop (nothing further
/// is acknowledged).
pub async fn deliver(
    ctx: &WriterContext,
    mut items: Vec<Item>,
    lags: &mut HashMap<Name, prometheus::Histogram>,
) -> bool {
    let m = metrics();
    let name = ctx.queue.name().to_string();
    let component = format!("sink {name}");
    let mut delays: Option<(Failure, Box<dyn Iterator<Item = Duration> + Send>)> = None;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        if items.iter().any(Item::is_fenced_off) {
            let (off, keep): (Vec<Item>, Vec<Item>) = items.into_iter().partition(Item::is_fenced_off);
            tracing::warn!(sink = %name, records = off.len(), "records read under a DynamoDB lease that is no longer valid are abandoned unapplied and unconfirmed (the shard's next owner reads them again)");
            ctx.queue.abandon(&off);
            items = keep;
            if items.is_empty() {
                return true;
            }
        }
        let current = ctx.slot.load();
        let records: Vec<Arc<Record>> = items.iter().map(|i| Arc::clone(&i.rec)).collect();
        let started = Instant::now();
        let result = tokio::select! {
            r = current.sink.write(&records) => Some(r),
            _ = ctx.slot.changed(current.generation) => None,
            _ = ctx.hard_stop.cancelled() => return false,
        };
        let Some(result) = result else {
            tracing::info!(sink = %name, records = items.len(), "sink config changed; the batch goes to the new target");
            attempt = 0;
            delays = None;
            continue;
        };
        m.sink_request_duration.with_label_values(&[&name]).observe(started.elapsed().as_secs_f64());
        m.sink_batch_size.with_label_values(&[&name]).observe(items.len() as f64);
        let failure = match result {
            Ok(outcomes) if outcomes.len() == items.len() => {
                if attempt > 1 {
                    tracing::info!(sink = %name, attempt, "sink write succeeded after retries");
                }
                m.sink_up.with_label_values(&[&name]).set(1);
                ctx.health.set(&component, Ok(()));
                let now = Utc::now();
                let mut retry = Vec::new();
                let mut done = Vec::with_capacity(items.len());
                let mut applied = 0u64;
                for (item, outcome) in items.into_iter().zip(outcomes) {
                    match outcome {
                        ItemOutcome::Applied => {
                            applied += 1;
                            observe_lag(lags, &item.rec, now);
                            done.push(item);
                        }
                        ItemOutcome::Rejected(reason) => {
                            policy::report(&component, Failure::Rejected, &reason, false);
                            if !dead_letter(
                                &ctx.dlq,
                                &item.rec.pipeline,
                                &name,
                                &reason,
                                &item.rec.change,
                                &ctx.hard_stop,
                            )
                            .await
                            {
                                ctx.queue.complete(&done);
                                return false;
                            }
                            done.push(item);
                        }
                        ItemOutcome::Retry(reason) => {
                            m.sink_retries.with_label_values(&[&name, "item"]).inc();
                            if retry.is_empty() && policy::worth_logging(attempt) {
                                tracing::warn!(sink = %name, reason = %reason, relation = %item.rec.change.relation, key = %item.rec.change.key_display(), "sink refused an item for now; retrying it");
                            }
                            retry.push(item);
                        }
                    }
                }
                if applied > 0 {
                    m.sink_records.with_label_values(&[&name, "applied"]).inc_by(applied);
                }
                ctx.queue.complete(&done);
                if retry.is_empty() {
                    return true;
                }
                items = retry;
                Failure::Transient
            }
            Ok(outcomes) => {
                let msg = format!("sink returned {} outcomes for {} records", outcomes.len(), items.len());
                policy::report(&component, Failure::Transient, &msg, policy::worth_logging(attempt));
                Failure::Transient
            }
            Err(e) => {
                let failure = match e.kind {
                    SinkErrorKind::Transient => Failure::Transient,
                    SinkErrorKind::Fatal => Failure::Fatal,
                };
                m.sink_retries.with_label_values(&[&name, "request"]).inc();
                m.sink_up.with_label_values(&[&name]).set(0);
                ctx.health.set(&component, Err(format!("{}: {}", failure.label(), e.msg)));
                policy::report(&component, failure, &e.to_string(), policy::worth_logging(attempt));
                failure
            }
        };
        // Memory records that waited too long go to the spool: the spooled copy is written
        // later in this lane, and the source may confirm past them meanwhile.
        if items.iter().any(|i| i.held) {
            let oldest = items.iter().filter(|i| i.held).filter_map(|i| ctx.queue.held_since(i.seq)).min();
            match oldest {
                Some(o) if ctx.queue.spill_after_failure(o) => items.retain(|i| !i.held),
                Some(_) => {}
                None => items.retain(|i| !i.held), // already spilled
            }
            if items.is_empty() {
                return true;
            }
        }
        let Decision::Retry(profile) = failure.decision() else { unreachable!("rejections are per item") };
        if delays.as_ref().is_none_or(|(f, _)| *f != failure) {
            delays = Some((failure, Box::new(policy::backoff(profile))));
        }
        let d = delays.as_mut().and_then(|(_, it)| it.next()).unwrap_or(Duration::from_secs(30));
        if !pause(d, ctx, current.generation).await {
            return false;
        }
    }
}

/// With `[dlq.s3]`: put the entry in S3, retrying with backoff while S3 does not answer or
/// refuses (the lane, and with it the source's confirmed position, waits; it resumes once S3
/// takes the entry). False if the hard stop fired first.
async fn store_durably(
    dlq: &Arc<DeadLetterQueue>,
    line: &str,
    pipeline: &str,
    sink: &str,
    hard_stop: &CancellationToken,
) -> bool {
    let Some(store) = dlq.durable() else { return true };
    let mut delays = policy::backoff(policy::Profile::Connect);
    let mut first = true;
    loop {
        let attempt = tokio::select! {
            r = store.put_entry(line) => r,
            _ = hard_stop.cancelled() => return false,
        };
        match attempt {
            Ok(()) => {
                if !first {
                    tracing::info!(pipeline, sink, location = %store.location(), "dead letters reach S3 again");
                }
                dlq.stored(line);
                return true;
            }
            Err(e) => {
                metrics().dlq_write_failures.inc();
                let kind = match e {
                    crate::dlq::s3::S3Error::Unreachable { .. } => Failure::Transient,
                    _ => Failure::Fatal,
                };
                policy::report(
                    &format!("dead-letter queue ({pipeline} → {sink})"),
                    kind,
                    &format!("cannot store a dead letter in S3 (the change is not acknowledged until it is): {e}"),
                    first,
                );
                first = false;
                tokio::select! {
                    _ = hard_stop.cancelled() => return false,
                    _ = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(30))) => {}
                }
            }
        }
    }
}

fn observe_lag(lags: &mut HashMap<Name, prometheus::Histogram>, rec: &Record, now: chrono::DateTime<Utc>) {
    if let Some(t) = rec.change.commit_time {
        let h = lags.entry(Arc::clone(&rec.pipeline)).or_insert_with(|| metrics().lag_for(&rec.pipeline));
        h.observe(((now - t).num_microseconds().unwrap_or(0).max(0) as f64) / 1e6);
    }
}

/// Write one dead letter durably and count it; false if the hard stop fired first (then
/// nothing may be acknowledged). See [`keep_dead_letter`].
pub async fn dead_letter(
    dlq: &Arc<DeadLetterQueue>,
    pipeline: &str,
    sink: &str,
    reason: &str,
    change: &Change,
    hard_stop: &CancellationToken,
) -> bool {
    if !keep_dead_letter(dlq, &DeadLetter { pipeline, sink, reason, change }, hard_stop).await {
        return false;
    }
    let m = metrics();
    m.sink_records.with_label_values(&[sink, "dead_lettered"]).inc();
    tracing::warn!(pipeline, sink, relation = %change.relation, key = %change.key_display(), position = %change.position, reason, "change dead-lettered");
    true
}

/// Write one dead letter durably: to the local file (on a blocking thread: it fsyncs), then to
/// S3 when that is the durable record, retrying each with backoff until it is written (the
/// caller, and so the source's confirmed position, waits meanwhile). False if the hard stop
/// fired first.
pub async fn keep_dead_letter(
    dlq: &Arc<DeadLetterQueue>,
    entry: &DeadLetter<'_>,
    hard_stop: &CancellationToken,
) -> bool {
    let m = metrics();
    let (pipeline, sink) = (entry.pipeline, entry.sink);
    let line = DeadLetterQueue::encode(entry);
    let mut delays = policy::backoff(policy::Profile::Local);
    let mut first = true;
    loop {
        let (q, l) = (Arc::clone(dlq), line.clone());
        let r = tokio::task::spawn_blocking(move || q.write_line(l)).await;
        match r {
            Ok(Ok(())) => {
                if !store_durably(dlq, &line, pipeline, sink, hard_stop).await {
                    return false;
                }
                m.dlq_entries.with_label_values(&[pipeline, sink]).inc();
                m.dlq_bytes.set(dlq.total_bytes() as i64);
                return true;
            }
            other => {
                let msg = match other {
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                    Ok(Ok(())) => unreachable!(),
                };
                m.dlq_write_failures.inc();
                policy::report(
                    &format!("dead-letter queue ({pipeline} → {sink})"),
                    Failure::Local,
                    &format!("cannot record a dead letter (the change is not acknowledged until it can): {msg}"),
                    first,
                );
                first = false;
                tokio::select! {
                    _ = hard_stop.cancelled() => return false,
                    _ = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))) => {}
                }
            }
        }
    }
}
