//! `polysync check --online` for a DynamoDB source: the start-up checks of
//! [`super::DynamoSource::prepare`], read-only. The table and its stream (enabled, a view type
//! that carries the images the pipelines read), the shards the stream has now, and the
//! checkpoint store (the file, or the lease table with its leases); nothing is created.

use aws_sdk_dynamodbstreams::types::ShardIteratorType;

use super::{CheckpointConfig, DynamoSource, DynamoSourceConfig, StartAt, check_images, lease_client, setup};
use crate::checkpoint::lease::LeaseTable;
use crate::source::{OnlineReport, SourceEnv, SourceError, SourceNeeds};

/// Check one DynamoDB source as a start would, without creating anything. An error is what
/// `run` would refuse with.
pub async fn check_online(
    name: &str,
    cfg: &DynamoSourceConfig,
    needs: &SourceNeeds,
    env: &SourceEnv,
) -> Result<OnlineReport, SourceError> {
    let mut report = OnlineReport::default();
    let (stream_arn, has) = DynamoSource::stream_images(name, cfg, &env.aws).await?;
    check_images(name, needs.images, has)?;
    let view = match (has.new, has.old) {
        (true, true) => "NEW_AND_OLD_IMAGES",
        (true, false) => "NEW_IMAGE",
        (false, true) => "OLD_IMAGE",
        (false, false) => "KEYS_ONLY",
    };
    let sdk = crate::aws::sdk_config(&super::source_settings(cfg, &env.aws)).await;
    let streams = aws_sdk_dynamodbstreams::Client::new(&sdk);
    let (open, total) = shard_counts(&streams, &stream_arn).await.map_err(|e| setup(name, e))?;
    report.facts.push(format!(
        "stream {stream_arn} is enabled ({view}, which carries what the pipelines read); {total} shards, {open} open"
    ));
    if open > 0 {
        // The stream answers reads too, not only DescribeStream (permissions differ).
        readable(&streams, &stream_arn).await.map_err(|e| setup(name, e))?;
    }
    let start = match cfg.start {
        StartAt::TrimHorizon => "from the oldest record still in the stream (trim_horizon)",
        StartAt::Latest => "from the records written after it starts (latest)",
    };
    match &cfg.checkpoint {
        CheckpointConfig::File => {
            let path = env.state_dir.join(format!("checkpoints-{name}.redb"));
            report.facts.push(if path.exists() {
                format!("checkpoints in {}: shards resume where they were confirmed", path.display())
            } else {
                format!("no checkpoint file yet ({}): the first start reads every open shard {start}", path.display())
            });
        }
        CheckpointConfig::Dynamodb { table, create_table, endpoint_url, .. } => {
            let ddb = aws_sdk_dynamodb::Client::new(&sdk);
            let client = lease_client(endpoint_url.as_deref(), &env.aws, &ddb).await;
            let fact = LeaseTable::inspect(&client, table, *create_table, &stream_arn)
                .await
                .map_err(|e| setup(name, e.to_string()))?;
            report.facts.push(fact);
        }
    }
    Ok(report)
}

/// (open, all) shards of the stream, from DescribeStream's pages.
async fn shard_counts(streams: &aws_sdk_dynamodbstreams::Client, arn: &str) -> Result<(usize, usize), String> {
    let (mut open, mut total, mut start) = (0, 0, None::<String>);
    loop {
        let out = streams
            .describe_stream()
            .stream_arn(arn)
            .set_exclusive_start_shard_id(start.take())
            .send()
            .await
            .map_err(|e| format!("DescribeStream {arn}: {}", crate::sink::search::aws_error_text(&e)))?;
        let Some(d) = out.stream_description() else { return Ok((open, total)) };
        for s in d.shards() {
            total += 1;
            if s.sequence_number_range().is_some_and(|r| r.ending_sequence_number().is_none()) {
                open += 1;
            }
        }
        match d.last_evaluated_shard_id() {
            Some(last) => start = Some(last.to_string()),
            None => return Ok((open, total)),
        }
    }
}

/// GetShardIterator on the first open shard: the credentials may read records, not only
/// describe the stream.
async fn readable(streams: &aws_sdk_dynamodbstreams::Client, arn: &str) -> Result<(), String> {
    let out = streams
        .describe_stream()
        .stream_arn(arn)
        .send()
        .await
        .map_err(|e| format!("DescribeStream {arn}: {}", crate::sink::search::aws_error_text(&e)))?;
    let shard = out
        .stream_description()
        .and_then(|d| {
            d.shards().iter().find(|s| s.sequence_number_range().is_some_and(|r| r.ending_sequence_number().is_none()))
        })
        .and_then(|s| s.shard_id().map(str::to_string));
    let Some(shard) = shard else { return Ok(()) };
    streams
        .get_shard_iterator()
        .stream_arn(arn)
        .shard_id(&shard)
        .shard_iterator_type(ShardIteratorType::Latest)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| {
            format!("GetShardIterator on {shard} (reading the stream): {}", crate::sink::search::aws_error_text(&e))
        })
}
