//! One shard's reader: GetShardIterator from the checkpoint, GetRecords within the per-shard
//! call limit, records into the lanes under the shard's own acknowledgement window, confirmed
//! positions written back as checkpoints, and a closed shard drained and marked finished.
//!
//! Errors by name:
//! * `ExpiredIteratorException`: a new iterator after the last record read (or the checkpoint),
//!   re-acquired with backoff so a server that keeps expiring it cannot spin us;
//! * `TrimmedDataAccessException`: records expired from the stream before we read them. That
//!   is data loss upstream: logged as an error, counted in `polysync_ddb_trimmed_data_total`,
//!   and reading continues from the oldest record still there;
//! * throttling: exponential backoff with jitter;
//! * `ResourceNotFoundException`: the stream or the shard is gone; the reader stops and the
//!   source finds out which (a shard past the 24 h retention is marked finished, by name).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodbstreams::Client;
use aws_sdk_dynamodbstreams::error::SdkError;
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use tokio_util::sync::CancellationToken;

use super::decode;
use super::stream_error::{StreamFault, describe};
use crate::change::Name;
use crate::checkpoint::store::{ShardCheckpoint, ShardStore, StoreError};
use crate::retry;
use crate::source::{Output, Partition, Rejects};
use crate::telemetry::metrics;

/// DynamoDB Streams allows five GetRecords calls per second per shard.
const MIN_CALL_SPACING: Duration = Duration::from_millis(210);

/// Everything a reader needs.
pub struct ShardReader {
    /// Source name.
    pub source: Name,
    /// Table name (the changes' relation).
    pub relation: Name,
    /// Stream ARN.
    pub stream: String,
    /// Shard id.
    pub shard: Name,
    /// Where to resume.
    pub checkpoint: Option<ShardCheckpoint>,
    /// Streams client.
    pub client: Client,
    /// Checkpoints (and lease ownership).
    pub store: Arc<dyn ShardStore>,
    /// Lanes.
    pub output: Arc<dyn Output>,
    /// The dead-letter queue, for records that cannot be decoded.
    pub rejects: Arc<dyn Rejects>,
    /// In-flight limit for this shard.
    pub max_in_flight: usize,
    /// Idle pause.
    pub poll_interval: Duration,
    /// Checkpoint cadence.
    pub checkpoint_interval: Duration,
    /// Counts readers that hold their first iterator (a backfill starts only after that, so
    /// every write after the scan's start is in the stream).
    pub positioned: Arc<std::sync::atomic::AtomicUsize>,
    /// Told of every record before it is handed over, so a backfill row it supersedes is
    /// dropped rather than applied after it.
    pub fence: Arc<super::scan_fence::ScanFence>,
    /// Global tables: drop the writes of other regions (counted).
    pub only_writes_from: Option<super::config::OriginFilter>,
}

/// How a reader ended.
#[derive(Debug)]
pub enum ReaderEnd {
    /// Closed shard fully applied and marked finished.
    Finished,
    /// Stopped on request (shutdown or a lost lease); in-flight records may replay elsewhere.
    Stopped,
    /// The stream or this shard is gone (`ResourceNotFoundException`): the source tells which
    /// (a shard that expired from the stream is not a reason to stop the others).
    Gone(String),
    /// A permanent error occurred.
    Failed(String),
}

impl ShardReader {
    async fn iterator(
        &self,
        kind: ShardIteratorType,
        after: Option<&str>,
    ) -> Result<Option<String>, SdkError<aws_sdk_dynamodbstreams::operation::get_shard_iterator::GetShardIteratorError>>
    {
        let mut req =
            self.client.get_shard_iterator().stream_arn(&self.stream).shard_id(&*self.shard).shard_iterator_type(kind);
        if let Some(seq) = after {
            req = req.sequence_number(seq);
        }
        Ok(req.send().await?.shard_iterator().map(str::to_string))
    }

    /// Read until the shard is finished, `stop` fires, or a permanent error.
    pub async fn run(self, stop: CancellationToken, hard_stop: CancellationToken) -> ReaderEnd {
        let m = metrics();
        let src = self.source.to_string();
        // Under a lease table every record carries the lease's validity: once it lapses, what
        // is not applied yet is abandoned unconfirmed, and this reader stops.
        let lease = self.store.fence(&self.stream, &self.shard);
        let window = self.output.partition(&format!("{}:{}", self.source, self.shard), self.max_in_flight, 0, lease);
        let window = &*window;
        // Ordinal (window position) → sequence number, for turning confirmations into checkpoints.
        let mut positions: VecDeque<(u64, String)> = VecDeque::new();
        let mut ordinal = 0u64;
        let mut last_read: Option<String> = match &self.checkpoint {
            Some(ShardCheckpoint::At(seq)) => Some(seq.clone()),
            Some(ShardCheckpoint::Finished) => return ReaderEnd::Finished,
            Some(ShardCheckpoint::LatestFrom(_)) | None => None,
        };
        // `start = "latest"` from the first start on: the shard is read from its beginning and
        // records created before that moment are passed over. (A LATEST iterator would lose
        // what was written while a crash kept the reader away before its first checkpoint.)
        let mut not_before = match &self.checkpoint {
            Some(ShardCheckpoint::LatestFrom(ms)) => Some(*ms),
            _ => None,
        };
        let mut saved: Option<String> = last_read.clone();
        let mut last_save = Instant::now();
        let new_delays = || crate::retry::backoff_between(Duration::from_millis(200), Duration::from_secs(20));
        let mut delays = new_delays();
        let pause = |d: Duration| {
            let stop = stop.clone();
            async move {
                tokio::select! {
                    _ = stop.cancelled() => false,
                    _ = tokio::time::sleep(d) => true,
                }
            }
        };
        let initial = match &last_read {
            Some(seq) => (ShardIteratorType::AfterSequenceNumber, Some(seq.clone())),
            None => (ShardIteratorType::TrimHorizon, None),
        };
        let mut iterator: Option<String> = None;
        let mut want_iterator = Some(initial);
        let mut last_call = Instant::now() - MIN_CALL_SPACING;
        let mut expired_in_a_row = 0u32;
        let mut positioned_once = false;
        'read: loop {
            if stop.is_cancelled() {
                break;
            }
            if window.is_fenced_off() {
                return self.fenced_off(window);
            }
            // Write confirmed progress (only what every sink has applied).
            let confirmed = window.confirmed();
            let mut newest = None;
            while let Some((o, _)) = positions.front() {
                if *o > confirmed {
                    break;
                }
                newest = positions.pop_front().map(|(_, s)| s);
            }
            if let Some(seq) = newest {
                saved = Some(seq);
            }
            if last_save.elapsed() >= self.checkpoint_interval {
                if let Err(e) = self.save(&saved).await {
                    return e;
                }
                last_save = Instant::now();
            }
            if let Some((kind, after)) = want_iterator.take() {
                match self.iterator(kind.clone(), after.as_deref()).await {
                    Ok(Some(it)) => {
                        if iterator.is_none() && !std::mem::replace(&mut positioned_once, true) {
                            self.positioned.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        iterator = Some(it)
                    }
                    Ok(None) => return self.finish(window, &stop, &hard_stop).await,
                    Err(e) => {
                        let fault = StreamFault::of_get_shard_iterator(&e);
                        match fault {
                            StreamFault::Gone => return ReaderEnd::Gone(describe(&e)),
                            StreamFault::Trimmed => {
                                self.trimmed(&src, &describe(&e));
                                want_iterator = Some((ShardIteratorType::TrimHorizon, None));
                                continue;
                            }
                            StreamFault::Throttled => m.ddb_throttles.with_label_values(&[&src]).inc(),
                            _ => {}
                        }
                        retry::report(
                            &format!("source {src}"),
                            fault.failure(),
                            &format!("shard {}: GetShardIterator: {}", self.shard, describe(&e)),
                            true,
                        );
                        want_iterator = Some((kind, after));
                        if !pause(delays.next().unwrap_or(Duration::from_secs(20))).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            let Some(it) = iterator.take() else { continue };
            let wait = MIN_CALL_SPACING.saturating_sub(last_call.elapsed());
            if !wait.is_zero() && !pause(wait).await {
                break;
            }
            last_call = Instant::now();
            let resp = self.client.get_records().shard_iterator(&it).limit(1000).send().await;
            let out = match resp {
                Ok(out) => out,
                Err(e) => {
                    let fault = StreamFault::of_get_records(&e);
                    match fault {
                        StreamFault::IteratorExpired => {
                            m.ddb_iterators_expired.with_label_values(&[&src]).inc();
                            expired_in_a_row += 1;
                            tracing::info!(source = %src, shard = %self.shard, "shard iterator expired; re-acquiring after the last record read");
                            want_iterator = Some(match &last_read {
                                Some(seq) => (ShardIteratorType::AfterSequenceNumber, Some(seq.clone())),
                                None => (ShardIteratorType::TrimHorizon, None),
                            });
                            if expired_in_a_row > 1 && !pause(delays.next().unwrap_or(Duration::from_secs(20))).await {
                                break;
                            }
                        }
                        StreamFault::Trimmed => {
                            self.trimmed(&src, &describe(&e));
                            want_iterator = Some((ShardIteratorType::TrimHorizon, None));
                        }
                        StreamFault::Gone | StreamFault::Disabled => return ReaderEnd::Gone(describe(&e)),
                        StreamFault::Throttled => {
                            m.ddb_throttles.with_label_values(&[&src]).inc();
                            iterator = Some(it);
                            if !pause(delays.next().unwrap_or(Duration::from_secs(20))).await {
                                break;
                            }
                        }
                        fault => {
                            retry::report(
                                &format!("source {src}"),
                                fault.failure(),
                                &format!("shard {}: GetRecords: {}", self.shard, describe(&e)),
                                true,
                            );
                            iterator = Some(it);
                            if !pause(delays.next().unwrap_or(Duration::from_secs(20))).await {
                                break;
                            }
                        }
                    }
                    continue;
                }
            };
            expired_in_a_row = 0;
            delays = new_delays();
            let records = out.records();
            for rec in records {
                let change = match decode::change(&self.source, &self.relation, &self.shard, rec) {
                    Ok(c) => c,
                    Err(e) => {
                        // Kept in the dead-letter queue before anything reads past it.
                        let kept = decode::undecodable(&self.source, &self.relation, &self.shard, rec);
                        let reason = format!("undecodable DynamoDB stream record on shard {}: {e}", self.shard);
                        loop {
                            match self.rejects.reject(&kept, &reason).await {
                                Ok(()) => break,
                                Err(err) => {
                                    tracing::error!(source = %src, shard = %self.shard, error = %err, "cannot dead-letter an undecodable record; the shard waits");
                                    if !pause(Duration::from_secs(5)).await {
                                        break 'read;
                                    }
                                }
                            }
                        }
                        tracing::error!(source = %src, shard = %self.shard, error = %e, "an undecodable stream record was dead-lettered");
                        m.source_changes.with_label_values(&[src.as_str(), &*self.relation]).inc();
                        continue;
                    }
                };
                let seq = rec.dynamodb().and_then(|d| d.sequence_number()).unwrap_or_default().to_string();
                if let Some(cutoff) = not_before {
                    let created = change.commit_time.map(|t| t.timestamp_millis());
                    // Second-resolution creation times: a record of the same second is kept.
                    if created.is_some_and(|c| c < cutoff - 999) {
                        continue;
                    }
                    not_before = None;
                }
                m.source_changes.with_label_values(&[src.as_str(), &*self.relation]).inc();
                if self.only_writes_from.as_ref().is_some_and(|f| f.is_foreign(&change)) {
                    // Another region's write (only_writes_from): passed over, its position kept.
                    m.ddb_foreign_writes.with_label_values(&[&src]).inc();
                    ordinal += 1;
                    window.mark(ordinal);
                    positions.push_back((ordinal, seq.clone()));
                    last_read = Some(seq);
                    continue;
                }
                if let Some(t) = change.commit_time {
                    let lag = (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0;
                    m.source_lag.with_label_values(&[&src]).set(lag);
                }
                self.fence.stream_record(&change.key, change.commit_time.map(|t| t.timestamp()));
                if crate::source::send(window, change, &hard_stop).await.is_err() {
                    if window.is_fenced_off() {
                        return self.fenced_off(window);
                    }
                    return ReaderEnd::Stopped;
                }
                ordinal += 1;
                window.mark(ordinal);
                positions.push_back((ordinal, seq.clone()));
                last_read = Some(seq);
            }
            m.in_flight.with_label_values(&[&src]).set(window.in_flight() as i64);
            match out.next_shard_iterator() {
                None => return self.finish(window, &stop, &hard_stop).await,
                Some(next) => iterator = Some(next.to_string()),
            }
            if records.is_empty() && !pause(self.poll_interval).await {
                break;
            }
        }
        // Stopping: let what is in flight finish (bounded by the hard stop and by the lease's
        // validity), then save it.
        self.drain(window, &hard_stop).await;
        if window.is_fenced_off() {
            return self.fenced_off(window);
        }
        let confirmed = window.confirmed();
        if let Some((_, seq)) = positions.iter().take_while(|(o, _)| *o <= confirmed).last() {
            saved = Some(seq.clone());
        }
        let _ = self.save(&saved).await;
        ReaderEnd::Stopped
    }

    fn trimmed(&self, src: &str, detail: &str) {
        metrics().ddb_trimmed.with_label_values(&[src]).inc();
        tracing::error!(
            source = %src,
            shard = %self.shard,
            detail,
            "DATA LOST UPSTREAM: stream records expired (24 h retention) before they were read; continuing from the oldest record still in the stream"
        );
    }

    /// The lease's validity ended (lost, or not renewed in time): nothing more is applied or
    /// confirmed for this shard here; whoever owns it next resumes from the last checkpoint.
    fn fenced_off(&self, window: &dyn Partition) -> ReaderEnd {
        let n = window.in_flight();
        tracing::warn!(
            source = %self.source,
            shard = %self.shard,
            in_flight = n,
            "the shard's lease is no longer valid: stopped reading; records read but not applied are abandoned unconfirmed (the shard's next owner reads them again)"
        );
        ReaderEnd::Stopped
    }

    async fn drain(&self, window: &dyn Partition, hard_stop: &CancellationToken) {
        while window.in_flight() > 0 && !window.is_fenced_off() {
            tokio::select! {
                _ = hard_stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    async fn save(&self, saved: &Option<String>) -> Result<(), ReaderEnd> {
        let Some(seq) = saved else { return Ok(()) };
        if Some(seq) == self.checkpoint_seq() {
            return Ok(());
        }
        match self.store.checkpoint(&self.stream, &self.shard, ShardCheckpoint::At(seq.clone())).await {
            Ok(()) => Ok(()),
            Err(StoreError::LeaseLost(_)) => Err(ReaderEnd::Stopped),
            Err(e) => {
                tracing::warn!(source = %self.source, shard = %self.shard, error = %e, "checkpoint not written; will retry");
                Ok(())
            }
        }
    }

    fn checkpoint_seq(&self) -> Option<&String> {
        match &self.checkpoint {
            Some(ShardCheckpoint::At(s)) => Some(s),
            _ => None,
        }
    }

    /// A closed shard: everything read must be applied before it is marked finished.
    async fn finish(
        &self,
        window: &dyn Partition,
        stop: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> ReaderEnd {
        self.drain(window, hard_stop).await;
        if window.in_flight() > 0 {
            return ReaderEnd::Stopped;
        }
        let _ = stop;
        loop {
            match self.store.checkpoint(&self.stream, &self.shard, ShardCheckpoint::Finished).await {
                Ok(()) => {
                    tracing::info!(source = %self.source, shard = %self.shard, "shard finished (closed and fully applied)");
                    return ReaderEnd::Finished;
                }
                Err(StoreError::LeaseLost(_)) => return ReaderEnd::Stopped,
                Err(e) => {
                    tracing::warn!(source = %self.source, shard = %self.shard, error = %e, "cannot mark the shard finished yet; retrying");
                    tokio::select! {
                        _ = hard_stop.cancelled() => return ReaderEnd::Stopped,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
}
