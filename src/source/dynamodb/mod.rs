//! DynamoDB Streams source: the stream resolved from a table or ARN, its shard graph walked
//! parents-before-children, one reader per owned shard, checkpoints in a file (one instance)
//! or a DynamoDB lease table (several instances sharing the shards).
//!
//! The coordinator refreshes the shard list on an interval (and at once when a shard
//! finishes, so a closed parent hands over to its children without the reader going idle),
//! asks the store which shards this instance should read, starts readers for new ones and
//! stops readers whose lease was lost. A failure of this source stops this source only.

pub mod backfill;
pub mod config;
pub mod decode;
mod online;
pub mod reader;
pub mod scan_fence;
pub mod stream_error;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodbstreams::types::{StreamStatus, StreamViewType};
use futures::future::BoxFuture;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{CheckpointConfig, DynamoSourceConfig, StartAt};
pub use online::check_online;
use reader::{ReaderEnd, ShardReader};

use super::SourceError;
use crate::aws::AwsSettings;
use crate::change::Name;
use crate::checkpoint::lease::LeaseTable;
use crate::checkpoint::store::{FileStore, ShardCheckpoint, ShardInfo, ShardStore};
use crate::source::postgres::SnapshotPipelines;
use crate::source::{Images, Output, Source, SourceAdmin, SourceConfig, SourceEnv, SourceNeeds};
use crate::telemetry::{Health, metrics};

/// A resolved, checked DynamoDB source.
pub struct DynamoSource {
    name: Name,
    relation: Name,
    cfg: DynamoSourceConfig,
    stream_arn: String,
    streams: aws_sdk_dynamodbstreams::Client,
    store: Arc<dyn ShardStore>,
    max_in_flight: usize,
    ddb: aws_sdk_dynamodb::Client,
    state_dir: std::path::PathBuf,
    pipelines: SnapshotPipelines,
    images: Images,
}

/// Refuse when the pipelines read an image the stream's records do not carry.
fn check_images(name: &str, needs: Images, has: Images) -> Result<(), SourceError> {
    if (needs.new && !has.new) || (needs.old && !has.old) {
        let view = match (has.new, has.old) {
            (true, true) => "NEW_AND_OLD_IMAGES",
            (true, false) => "NEW_IMAGE",
            (false, true) => "OLD_IMAGE",
            (false, false) => "KEYS_ONLY",
        };
        return Err(setup(
            name,
            format!(
                "the pipelines read {}{}{} but the stream's view type is {view}; use NEW_AND_OLD_IMAGES (or change the pipelines)",
                if needs.new { "after/row (NewImage)" } else { "" },
                if needs.new && needs.old { " and " } else { "" },
                if needs.old { "before (OldImage)" } else { "" },
            ),
        ));
    }
    Ok(())
}

/// Reload-time checks of a DynamoDB source: the images the new pipelines read.
struct DynamoAdmin {
    name: Name,
    cfg: DynamoSourceConfig,
    images: Images,
    pipelines: SnapshotPipelines,
}

impl SourceAdmin for DynamoAdmin {
    fn recheck<'a>(&'a self, needs: &'a SourceNeeds) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            check_images(&self.name, needs.images, self.images)?;
            self.pipelines.store(Arc::new(needs.snapshots.clone()));
            Ok(())
        })
    }

    fn same_config(&self, cfg: &SourceConfig) -> bool {
        matches!(cfg, SourceConfig::Dynamodb(c) if *c == self.cfg)
    }
}

impl Source for DynamoSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn admin(&self) -> Arc<dyn SourceAdmin> {
        Arc::new(DynamoAdmin {
            name: Arc::clone(&self.name),
            cfg: self.cfg.clone(),
            images: self.images,
            pipelines: Arc::clone(&self.pipelines),
        })
    }

    fn run(self: Box<Self>, ctx: super::RunContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(self.stream(ctx.output, ctx.rejects, ctx.health, ctx.cancel, ctx.hard_stop))
    }
}

fn setup(source: &str, msg: impl Into<String>) -> SourceError {
    SourceError::Setup { source_name: source.to_string(), msg: msg.into() }
}

fn aws_text<E: ProvideErrorMetadata + std::error::Error + 'static>(e: &aws_sdk_dynamodb::error::SdkError<E>) -> String {
    match e {
        aws_sdk_dynamodb::error::SdkError::ServiceError(s) => {
            format!("{}: {}", s.err().code().unwrap_or("error"), s.err().message().unwrap_or(""))
        }
        other => {
            let t = crate::sink::search::aws_error_text(other);
            if t.contains("credentials") || t.contains("Credentials") {
                format!("no AWS credentials (environment, profile, task role or instance profile): {t}")
            } else {
                t
            }
        }
    }
}

/// The client of the DynamoDB that holds the lease table: the source's, or another endpoint.
async fn lease_client(
    endpoint_url: Option<&str>,
    aws: &AwsSettings,
    source_client: &aws_sdk_dynamodb::Client,
) -> aws_sdk_dynamodb::Client {
    match endpoint_url {
        Some(e) => {
            let mut s = aws.clone();
            s.endpoint_url = Some(e.to_string());
            aws_sdk_dynamodb::Client::new(&crate::aws::sdk_config(&s).await)
        }
        None => source_client.clone(),
    }
}

/// The source's own settings with its `endpoint_url` applied.
fn source_settings(cfg: &DynamoSourceConfig, aws: &AwsSettings) -> AwsSettings {
    let mut settings = aws.clone();
    if let Some(e) = &cfg.endpoint_url {
        settings.endpoint_url = Some(e.clone());
    }
    settings
}

impl DynamoSource {
    /// Resolve and check the stream; open the checkpoint store. `needs` says which images the
    /// pipelines read (a missing one is a start-up error).
    pub async fn prepare(
        name: &str,
        cfg: &DynamoSourceConfig,
        needs: &SourceNeeds,
        env: &SourceEnv,
    ) -> Result<DynamoSource, SourceError> {
        let (aws, state_dir, max_in_flight) = (&env.aws, env.state_dir.as_path(), env.max_in_flight);
        let (stream_arn, has) = Self::stream_images(name, cfg, aws).await?;
        check_images(name, needs.images, has)?;
        let sdk = crate::aws::sdk_config(&source_settings(cfg, aws)).await;
        let ddb = aws_sdk_dynamodb::Client::new(&sdk);
        // Our reader handles throttling itself (backoff with jitter, counted), so the SDK's own
        // retries are off for stream calls.
        let streams = aws_sdk_dynamodbstreams::Client::from_conf(
            aws_sdk_dynamodbstreams::config::Builder::from(&sdk)
                .retry_config(aws_sdk_dynamodbstreams::config::retry::RetryConfig::disabled())
                .build(),
        );
        let store: Arc<dyn ShardStore> = match &cfg.checkpoint {
            CheckpointConfig::File => Arc::new(
                FileStore::open(&state_dir.join(format!("checkpoints-{name}.redb")))
                    .map_err(|e| setup(name, e.to_string()))?,
            ),
            CheckpointConfig::Dynamodb { table, create_table, worker_id, lease_duration, endpoint_url } => {
                let lease_client = lease_client(endpoint_url.as_deref(), aws, &ddb).await;
                let worker = worker_id.clone().unwrap_or_else(|| {
                    let host = std::fs::read_to_string("/etc/hostname")
                        .map(|h| h.trim().to_string())
                        .unwrap_or_else(|_| "host".into());
                    format!("{host}-{}", std::process::id())
                });
                Arc::new(
                    LeaseTable::open(
                        lease_client,
                        table,
                        *create_table,
                        worker,
                        lease_duration.unwrap_or(Duration::from_secs(30)),
                        name,
                    )
                    .await
                    .map_err(|e| setup(name, e.to_string()))?,
                )
            }
        };
        Ok(DynamoSource {
            name: Name::from(name),
            relation: Name::from(cfg.table_name().as_str()),
            cfg: cfg.clone(),
            stream_arn,
            streams,
            store,
            max_in_flight,
            ddb,
            state_dir: state_dir.to_path_buf(),
            pipelines: Arc::new(ArcSwap::from_pointee(needs.snapshots.clone())),
            images: has,
        })
    }

    /// The stream's ARN and which images its records carry.
    async fn stream_images(
        name: &str,
        cfg: &DynamoSourceConfig,
        aws: &AwsSettings,
    ) -> Result<(String, Images), SourceError> {
        let sdk = crate::aws::sdk_config(&source_settings(cfg, aws)).await;
        let ddb = aws_sdk_dynamodb::Client::new(&sdk);
        let streams = aws_sdk_dynamodbstreams::Client::new(&sdk);
        let stream_arn = match (&cfg.table, &cfg.stream_arn) {
            (Some(table), _) => {
                let out = ddb.describe_table().table_name(table).send().await.map_err(|e| match &e {
                    aws_sdk_dynamodb::error::SdkError::ServiceError(s) if s.err().is_resource_not_found_exception() => {
                        setup(name, format!("DynamoDB table {table:?} does not exist"))
                    }
                    _ => setup(name, format!("DescribeTable {table}: {}", aws_text(&e))),
                })?;
                out.table()
                    .and_then(|t| t.latest_stream_arn())
                    .filter(|_| out.table().and_then(|t| t.stream_specification()).is_some_and(|s| s.stream_enabled()))
                    .map(str::to_string)
                    .ok_or_else(|| {
                        setup(name, format!("DynamoDB table {table:?} has no stream; enable DynamoDB Streams (view type NEW_AND_OLD_IMAGES)"))
                    })?
            }
            (None, Some(arn)) => arn.clone(),
            (None, None) => unreachable!("validate() requires table or stream_arn"),
        };
        let desc = streams.describe_stream().stream_arn(&stream_arn).limit(1).send().await.map_err(|e| {
            if stream_error::StreamFault::of_describe_stream(&e) == stream_error::StreamFault::Gone {
                setup(name, format!("stream {stream_arn:?} does not exist (wrong ARN, or the stream was disabled)"))
            } else {
                setup(name, format!("DescribeStream {stream_arn}: {}", aws_text(&e)))
            }
        })?;
        let d = desc.stream_description().ok_or_else(|| setup(name, "DescribeStream returned no description"))?;
        if d.stream_status() == Some(&StreamStatus::Disabled) {
            return Err(setup(name, format!("stream {stream_arn} is disabled")));
        }
        let has = match d.stream_view_type() {
            Some(StreamViewType::NewAndOldImages) => Images { new: true, old: true },
            Some(StreamViewType::NewImage) => Images { new: true, old: false },
            Some(StreamViewType::OldImage) => Images { new: false, old: true },
            _ => Images { new: false, old: false },
        };
        Ok((stream_arn, has))
    }

    async fn key_names(&self) -> Result<Vec<String>, String> {
        let t = self.cfg.table_name();
        let out = self
            .ddb
            .describe_table()
            .table_name(&t)
            .send()
            .await
            .map_err(|e| format!("DescribeTable {t}: {}", aws_text(&e)))?;
        Ok(out
            .table()
            .map(|t| t.key_schema().iter().map(|k| k.attribute_name().to_string()).collect())
            .unwrap_or_default())
    }

    /// Every shard of the stream (DescribeStream, paginated).
    async fn shards(&self) -> Result<Vec<ShardInfo>, stream_error::DescribeFailure> {
        use stream_error::{DescribeFailure, StreamFault};
        let mut out = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let resp = self
                .streams
                .describe_stream()
                .stream_arn(&self.stream_arn)
                .set_exclusive_start_shard_id(start.clone())
                .send()
                .await
                .map_err(|e| DescribeFailure { fault: StreamFault::of_describe_stream(&e), message: aws_text(&e) })?;
            let d = resp.stream_description().ok_or_else(|| DescribeFailure {
                fault: StreamFault::Transient,
                message: "DescribeStream returned no description".into(),
            })?;
            if d.stream_status() == Some(&StreamStatus::Disabled) {
                return Err(DescribeFailure {
                    fault: StreamFault::Disabled,
                    message: format!("stream {} was disabled", self.stream_arn),
                });
            }
            for s in d.shards() {
                out.push(ShardInfo {
                    id: s.shard_id().unwrap_or_default().to_string(),
                    parents: s.parent_shard_id().map(|p| vec![p.to_string()]).unwrap_or_default(),
                });
            }
            match d.last_evaluated_shard_id() {
                Some(last) => start = Some(last.to_string()),
                None => return Ok(out),
            }
        }
    }

    /// A reader met `ResourceNotFoundException`. If the stream is gone, that ends the source
    /// (`Err`). If only the shard is (it expired from the stream: after a downtime past the 24 h
    /// retention, a shard polysync knew but never finished), its unread records are lost
    /// upstream: said by name, counted in `polysync_ddb_trimmed_data_total`, and the shard is
    /// marked finished so its children start and the shard map is pruned of it.
    async fn shard_gone(&self, shard: &str, detail: &str) -> Result<(), String> {
        let listed = match self.shards().await {
            Ok(list) => list.iter().any(|s| s.id == shard),
            Err(e) if matches!(e.fault, stream_error::StreamFault::Gone | stream_error::StreamFault::Disabled) => {
                return Err(format!("stream {} is gone: {e}", self.stream_arn));
            }
            Err(e) => {
                tracing::warn!(source = %self.name, shard, error = %e, "DescribeStream failed after a shard answered ResourceNotFound; retrying the shard");
                return Ok(());
            }
        };
        if listed {
            tracing::warn!(source = %self.name, shard, detail, "the stream lists the shard but it answered ResourceNotFound; retrying it");
            return Ok(());
        }
        metrics().ddb_trimmed.with_label_values(&[&self.name]).inc();
        tracing::error!(source = %self.name, shard, detail, "DATA LOST UPSTREAM: shard expired from the stream (24 h retention) before it was read to its end; marking it finished so its children are read");
        self.store
            .checkpoint(&self.stream_arn, shard, ShardCheckpoint::Finished)
            .await
            .map_err(|e| format!("cannot mark the expired shard {shard} finished: {e}"))
    }

    /// Run until `cancel`, or until the stream is gone.
    async fn stream(
        self,
        output: Arc<dyn Output>,
        rejects: Arc<dyn super::Rejects>,
        health: Arc<Health>,
        cancel: CancellationToken,
        hard_stop: CancellationToken,
    ) -> Result<(), SourceError> {
        let component = format!("source {}", self.name);
        let fail = |msg: String| SourceError::Stream { source_name: self.name.to_string(), msg };
        // Shard → (generation, stop) of its live reader. A reader that was told to stop stays in
        // `stopping` until it has drained: a new reader of the shard (the lease re-taken) starts
        // only then, so it never replays records the old one may still apply.
        let mut readers: HashMap<String, (u64, CancellationToken)> = HashMap::new();
        let mut stopping: HashMap<String, u64> = HashMap::new();
        let mut generation = 0u64;
        let mut tasks: JoinSet<(String, u64, ReaderEnd)> = JoinSet::new();
        let mut discover = tokio::time::interval(self.cfg.discovery_interval());
        let mut balance = tokio::time::interval(self.store.balance_interval());
        let mut need_discovery = true;
        // `start = "latest"`: this moment, for a stream the checkpoint store has never seen.
        let started_ms = chrono::Utc::now().timestamp_millis();
        let mut result = Ok(());
        let connected = metrics().source_connected.with_label_values(&[&self.name]);
        let positioned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let spawned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let fence = Arc::new(scan_fence::ScanFence::default());
        let backfill = match Some(()) {
            Some(()) => match self.key_names().await {
                Ok(key_names) => Some(tokio::spawn(
                    backfill::Backfiller {
                        source: Arc::clone(&self.name),
                        relation: Arc::clone(&self.relation),
                        table: self.cfg.table_name(),
                        client: self.ddb.clone(),
                        key_names,
                        segments: self.cfg.backfill_segments.unwrap_or(4).clamp(1, 1000),
                        page_size: 1000,
                        recheck_after: self.cfg.backfill_recheck_after.unwrap_or(backfill::RECHECK_AFTER),
                        max_in_flight: self.max_in_flight,
                        state_dir: self.state_dir.clone(),
                        pipelines: Arc::clone(&self.pipelines),
                        initial_allowed: matches!(self.cfg.checkpoint, config::CheckpointConfig::File),
                        output: Arc::clone(&output),
                        cancel: cancel.clone(),
                        positioned: Arc::clone(&positioned),
                        spawned: Arc::clone(&spawned),
                        fence: Arc::clone(&fence),
                    }
                    .run(),
                )),
                Err(e) => {
                    tracing::error!(source = %self.name, error = %e, "backfills disabled: cannot read the table's key schema");
                    None
                }
            },
            None => None,
        };
        loop {
            if need_discovery {
                need_discovery = false;
                match self.shards().await {
                    Ok(shards) => {
                        let latest_from = (self.cfg.start == StartAt::Latest).then_some(started_ms);
                        if let Err(e) = self.store.sync_shards(&self.stream_arn, &shards, latest_from).await {
                            health.set(&component, Err(e.to_string()));
                        }
                    }
                    Err(e)
                        if matches!(e.fault, stream_error::StreamFault::Gone | stream_error::StreamFault::Disabled) =>
                    {
                        result = Err(fail(format!("stream {} is gone: {e}", self.stream_arn)));
                        break;
                    }
                    Err(e) => {
                        crate::retry::report(
                            &format!("source {}", self.name),
                            e.fault.failure(),
                            &format!("DescribeStream: {e}"),
                            true,
                        );
                        health.set(&component, Err(e.to_string()));
                    }
                }
                balance.reset_immediately();
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = discover.tick() => need_discovery = true,
                _ = balance.tick() => match self.store.balance(&self.stream_arn).await {
                    Ok((owned, lost)) => {
                        for shard in lost {
                            if let Some((g, stop)) = readers.remove(&shard) {
                                stop.cancel();
                                stopping.insert(shard, g);
                            }
                        }
                        for o in owned {
                            if readers.contains_key(&o.shard) {
                                continue;
                            }
                            if stopping.contains_key(&o.shard) {
                                tracing::info!(source = %self.name, shard = %o.shard, "shard re-taken; its previous reader is still applying what it read, the new one starts after it");
                                continue;
                            }
                            let stop = CancellationToken::new();
                            generation += 1;
                            let g = generation;
                            readers.insert(o.shard.clone(), (g, stop.clone()));
                            let reader = ShardReader {
                                source: Arc::clone(&self.name),
                                relation: Arc::clone(&self.relation),
                                stream: self.stream_arn.clone(),
                                shard: Name::from(o.shard.as_str()),
                                checkpoint: o.checkpoint,
                                client: self.streams.clone(),
                                store: Arc::clone(&self.store),
                                output: Arc::clone(&output),
                                rejects: Arc::clone(&rejects),
                                max_in_flight: self.max_in_flight,
                                poll_interval: self.cfg.poll_interval(),
                                checkpoint_interval: self.cfg.checkpoint_interval(),
                                positioned: Arc::clone(&positioned),
                                fence: Arc::clone(&fence),
                                only_writes_from: self.cfg.only_writes_from.clone(),
                            };
                            spawned.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let shard = o.shard.clone();
                            let hard = hard_stop.clone();
                            tracing::info!(source = %self.name, shard = %shard, "reading shard");
                            tasks.spawn(async move { (shard, g, reader.run(stop, hard).await) });
                        }
                        connected.set(1);
                        health.set(&component, Ok(()));
                    }
                    Err(e) => {
                        tracing::warn!(source = %self.name, error = %e, "checkpoint store unavailable; retrying");
                        health.set(&component, Err(e.to_string()));
                    }
                },
                Some(done) = tasks.join_next() => {
                    let Ok((shard, g, end)) = done else { continue };
                    // Only this reader's own entry: the shard may have a newer reader by now.
                    if readers.get(&shard).is_some_and(|(live, _)| *live == g) {
                        readers.remove(&shard);
                    }
                    if stopping.get(&shard) == Some(&g) {
                        stopping.remove(&shard);
                        // Drained: a lease another instance asked for is handed over now.
                        if let Err(e) = self.store.release(&self.stream_arn, &shard).await {
                            tracing::warn!(source = %self.name, shard = %shard, error = %e, "cannot hand the lease over; it expires instead");
                        }
                        balance.reset_immediately();
                    }
                    match end {
                        ReaderEnd::Finished => need_discovery = true,
                        ReaderEnd::Stopped => {}
                        ReaderEnd::Gone(msg) => match self.shard_gone(&shard, &msg).await {
                            Ok(()) => need_discovery = true,
                            Err(msg) => {
                                result = Err(fail(msg));
                                break;
                            }
                        },
                        ReaderEnd::Failed(msg) => {
                            result = Err(fail(msg));
                            break;
                        }
                    }
                }
            }
        }
        // Stop the readers: each drains what it handed out (until the hard stop) and saves it.
        for (_, stop) in readers.values() {
            stop.cancel();
        }
        while tasks.join_next().await.is_some() {}
        for shard in readers.keys() {
            let _ = self.store.release(&self.stream_arn, shard).await;
        }
        connected.set(0);
        if let Some(b) = backfill {
            b.abort();
        }
        if let Err(e) = &result {
            health.set(&component, Err(e.to_string()));
        }
        result
    }
}
