//! Timestream for LiveAnalytics: `WriteRecords`, at most 100 records a call, attributes every
//! record of a call shares lifted into `CommonAttributes`, and `Version` from the change so a
//! replay upserts instead of being rejected.
//!
//! Each `RejectedRecord` is examined: one rejected because the table already holds a *newer*
//! version is superseded, which is success; any other reason dead-letters that change with the
//! reason, and the rest of the call stands. Throttling and server errors retry the call.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_timestreamwrite::Client;
use aws_sdk_timestreamwrite::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_timestreamwrite::operation::write_records::WriteRecordsError;
use aws_sdk_timestreamwrite::types::{
    Dimension, DimensionValueType, MeasureValue, MeasureValueType, Record as TsRecord, TimeUnit,
};
use std::sync::Arc;

use futures::future::BoxFuture;

use super::action::{Measure, Point};
use super::config::TimeseriesSinkConfig;
use crate::aws::AwsSettings;
use crate::sink::{BatchLimits, ItemOutcome, Payload, Record, Sink, SinkError, SinkErrorKind};

/// Most records per `WriteRecords` call (the service limit).
pub const MAX_RECORDS_PER_CALL: usize = 100;

/// A connected Timestream target.
pub struct TimestreamSink {
    name: String,
    endpoint: String,
    client: Client,
    database: String,
    table: Option<String>,
    limits: BatchLimits,
}

fn measure(m: &Measure) -> (String, MeasureValueType) {
    match m {
        Measure::Double(d) => (d.clone(), MeasureValueType::Double),
        Measure::Bigint(i) => (i.to_string(), MeasureValueType::Bigint),
        Measure::Varchar(s) => (s.clone(), MeasureValueType::Varchar),
        Measure::Boolean(b) => (b.to_string(), MeasureValueType::Boolean),
        Measure::Timestamp(ms) => (ms.to_string(), MeasureValueType::Timestamp),
    }
}

/// A point as a Timestream record, without the dimensions in `common`. A single field named
/// `value` is a single-measure record named after the measurement; otherwise a multi-measure
/// record with one measure per field.
pub fn record(p: &Point, common: &[(String, String)]) -> Result<TsRecord, String> {
    let dims = p
        .tags
        .iter()
        .filter(|t| !common.contains(t))
        .map(|(k, v)| {
            Dimension::builder()
                .name(k)
                .value(v)
                .dimension_value_type(DimensionValueType::Varchar)
                .build()
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut r = TsRecord::builder()
        .set_dimensions(Some(dims))
        .measure_name(&p.measurement)
        .time(p.time_nanos().to_string())
        .time_unit(TimeUnit::Nanoseconds)
        .version(p.version);
    if p.fields.len() == 1 && p.fields[0].0 == "value" {
        let (v, t) = measure(&p.fields[0].1);
        r = r.measure_value(v).measure_value_type(t);
    } else {
        let values = p
            .fields
            .iter()
            .map(|(k, m)| {
                let (v, t) = measure(m);
                MeasureValue::builder().name(k).value(v).r#type(t).build().map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        r = r.measure_value_type(MeasureValueType::Multi).set_measure_values(Some(values));
    }
    Ok(r.build())
}

/// Dimensions every point of a call shares.
pub fn shared_dimensions(points: &[&Point]) -> Vec<(String, String)> {
    let Some(first) = points.first() else { return Vec::new() };
    first.tags.iter().filter(|t| points.iter().all(|p| p.tags.contains(t))).cloned().collect()
}

impl TimestreamSink {
    /// Build the client (endpoint discovery against AWS, the configured endpoint otherwise) and
    /// check the database and default table (see [`Self::ensure_target`]).
    pub async fn connect(
        name: &str,
        cfg: &TimeseriesSinkConfig,
        aws: &AwsSettings,
        dry_run: bool,
    ) -> Result<TimestreamSink, SinkError> {
        let sdk = crate::aws::sdk_config(aws).await;
        let endpoint = aws.endpoint_url.clone().unwrap_or_else(|| "timestream (endpoint discovery)".into());
        let client = if aws.endpoint_url.is_some() {
            Client::new(&sdk)
        } else {
            Client::new(&sdk).with_endpoint_discovery_enabled().await.map(|(c, _reloader)| c).map_err(|e| {
                SinkError {
                    sink: name.to_string(),
                    endpoint: endpoint.clone(),
                    kind: SinkErrorKind::Transient,
                    msg: format!("endpoint discovery: {e}"),
                }
            })?
        };
        let sink = TimestreamSink {
            name: name.to_string(),
            endpoint,
            client,
            database: cfg.database.clone().unwrap_or_default(),
            table: cfg.table.clone(),
            limits: BatchLimits {
                max_records: cfg.batch_size.unwrap_or(500),
                linger: cfg.linger.unwrap_or(Duration::from_millis(20)),
            },
        };
        sink.ensure_target(cfg.create_database, cfg.create_table, dry_run).await?;
        Ok(sink)
    }

    /// The database and the default table exist at start, or are created where configured
    /// (not in a dry run), or the start is refused with the fix: a missing target is not found
    /// by the first write and then retried while the source waits.
    async fn ensure_target(&self, create_database: bool, create_table: bool, dry_run: bool) -> Result<(), SinkError> {
        let db = &self.database;
        let missing = |e: &dyn ProvideErrorMetadata| e.code() == Some("ResourceNotFoundException");
        let db_exists = match self.client.describe_database().database_name(db).send().await {
            Ok(_) => true,
            Err(SdkError::ServiceError(e)) if missing(e.err()) => false,
            Err(e) => return Err(self.setup_error(&e, format!("DescribeDatabase {db}"))),
        };
        if !db_exists && !create_database {
            return Err(self.error(
                SinkErrorKind::Fatal,
                format!("Timestream database {db:?} does not exist; create it (aws timestream-write create-database --database-name {db}) or set create_database = true"),
            ));
        }
        if !db_exists && !dry_run {
            self.client
                .create_database()
                .database_name(db)
                .send()
                .await
                .map_err(|e| self.setup_error(&e, format!("CreateDatabase {db}")))?;
            tracing::info!(sink = %self.name, database = %db, "created the Timestream database");
        }
        let Some(table) = &self.table else { return Ok(()) };
        let table_exists = if !db_exists {
            false
        } else {
            match self.client.describe_table().database_name(db).table_name(table).send().await {
                Ok(_) => true,
                Err(SdkError::ServiceError(e)) if missing(e.err()) => false,
                Err(e) => return Err(self.setup_error(&e, format!("DescribeTable {db}.{table}"))),
            }
        };
        if !table_exists && !create_table {
            return Err(self.error(
                SinkErrorKind::Fatal,
                format!("Timestream table {table:?} does not exist in database {db:?}; create it (aws timestream-write create-table --database-name {db} --table-name {table}) or set create_table = true"),
            ));
        }
        if !table_exists && !dry_run {
            self.client
                .create_table()
                .database_name(db)
                .table_name(table)
                .send()
                .await
                .map_err(|e| self.setup_error(&e, format!("CreateTable {db}.{table}")))?;
            tracing::info!(sink = %self.name, database = %db, table = %table, "created the Timestream table");
        }
        Ok(())
    }

    /// A start-up call that failed: a refusal by the service (access denied, validation) is
    /// permanent; no answer is transient (the start retries).
    fn setup_error<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
        &self,
        e: &SdkError<E, R>,
        call: String,
    ) -> SinkError {
        match e {
            SdkError::ServiceError(s) => self.error(
                SinkErrorKind::Fatal,
                format!("{call}: {}: {}", s.err().code().unwrap_or("error"), s.err().message().unwrap_or("")),
            ),
            other => {
                self.error(SinkErrorKind::Transient, format!("{call}: {}", crate::sink::search::aws_error_text(other)))
            }
        }
    }

    fn error(&self, kind: SinkErrorKind, msg: String) -> SinkError {
        SinkError { sink: self.name.clone(), endpoint: self.endpoint.clone(), kind, msg }
    }

    /// One call: (record index in the batch, point) pairs of one table.
    async fn call(
        &self,
        table: &str,
        items: &[(usize, &Point)],
        outcomes: &mut [ItemOutcome],
    ) -> Result<(), SinkError> {
        let points: Vec<&Point> = items.iter().map(|(_, p)| *p).collect();
        let common_dims = shared_dimensions(&points);
        let mut records = Vec::with_capacity(items.len());
        for (i, p) in items {
            match record(p, &common_dims) {
                Ok(r) => records.push(r),
                Err(e) => {
                    outcomes[*i] = ItemOutcome::Rejected(format!("timestream record: {e}"));
                    return Ok(());
                }
            }
        }
        let mut common = TsRecord::builder();
        if !common_dims.is_empty() {
            let dims = common_dims
                .iter()
                .map(|(k, v)| {
                    Dimension::builder().name(k).value(v).dimension_value_type(DimensionValueType::Varchar).build()
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.error(SinkErrorKind::Fatal, e.to_string()))?;
            common = common.set_dimensions(Some(dims));
        }
        let result = self
            .client
            .write_records()
            .database_name(&self.database)
            .table_name(table)
            .common_attributes(common.build())
            .set_records(Some(records))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e)) => match e.err() {
                WriteRecordsError::RejectedRecordsException(r) => {
                    for rej in r.rejected_records() {
                        let Some(&(i, p)) = items.get(rej.record_index() as usize) else { continue };
                        let superseded = rej.existing_version().is_some_and(|v| v > p.version);
                        if !superseded {
                            outcomes[i] = ItemOutcome::Rejected(format!(
                                "timestream rejected the record: {}{}",
                                rej.reason().unwrap_or("no reason given"),
                                rej.existing_version().map(|v| format!(" (existing version {v})")).unwrap_or_default()
                            ));
                        }
                    }
                    Ok(())
                }
                WriteRecordsError::ThrottlingException(_) | WriteRecordsError::InternalServerException(_) => Err(self
                    .error(
                        SinkErrorKind::Transient,
                        format!("{}: {}", e.err().code().unwrap_or("error"), e.err().message().unwrap_or("")),
                    )),
                WriteRecordsError::ValidationException(v) if items.len() > 1 => {
                    // The call names no record: split until the offending one stands alone.
                    let _ = v;
                    let (a, b) = items.split_at(items.len() / 2);
                    Box::pin(self.call(table, a, outcomes)).await?;
                    Box::pin(self.call(table, b, outcomes)).await
                }
                WriteRecordsError::ValidationException(v) => {
                    outcomes[items[0].0] = ItemOutcome::Rejected(format!("timestream: {}", v.message()));
                    Ok(())
                }
                other => Err(self.error(
                    SinkErrorKind::Fatal,
                    format!("{}: {}", other.code().unwrap_or("error"), other.message().unwrap_or("")),
                )),
            },
            Err(e) => Err(self.error(SinkErrorKind::Transient, crate::sink::search::aws_error_text(&e))),
        }
    }

    async fn write_batch(&self, batch: &[Arc<Record>]) -> Result<Vec<ItemOutcome>, SinkError> {
        let mut outcomes = vec![ItemOutcome::Applied; batch.len()];
        let mut by_table: BTreeMap<String, Vec<(usize, &Point)>> = BTreeMap::new();
        for (i, rec) in batch.iter().enumerate() {
            let Payload::Points(points) = &rec.payload else {
                outcomes[i] = ItemOutcome::Rejected("payload is not for a timeseries sink".into());
                continue;
            };
            for p in points {
                match p.table.as_ref().or(self.table.as_ref()) {
                    Some(t) => by_table.entry(t.clone()).or_default().push((i, p)),
                    None => {
                        outcomes[i] = ItemOutcome::Rejected(format!(
                            "point {} names no table and the sink has none",
                            p.measurement
                        ))
                    }
                }
            }
        }
        super::action::report_collisions(
            &self.name,
            batch.iter().filter_map(|r| match &r.payload {
                Payload::Points(p) => Some(p.as_slice()),
                _ => None,
            }),
        );
        for (table, items) in &by_table {
            for chunk in items.chunks(MAX_RECORDS_PER_CALL) {
                self.call(table, chunk, &mut outcomes).await?;
            }
        }
        Ok(outcomes)
    }
}

impl Sink for TimestreamSink {
    fn name(&self) -> &str {
        &self.name
    }
    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }
    fn limits(&self) -> BatchLimits {
        self.limits
    }
    fn write<'a>(&'a self, batch: &'a [Arc<Record>]) -> BoxFuture<'a, Result<Vec<ItemOutcome>, SinkError>> {
        Box::pin(self.write_batch(batch))
    }
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            self.client
                .describe_database()
                .database_name(&self.database)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.error(SinkErrorKind::Transient, crate::sink::search::aws_error_text(&e)))
        })
    }
}
