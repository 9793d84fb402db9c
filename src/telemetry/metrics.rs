//! Every metric polysync exports, in one place, with the names documented in docs/operations.md.
//!
//! Naming follows Prometheus conventions: `polysync_` prefix, base units, `_total` for counters,
//! `_seconds`, `_bytes`. Labels are bounded: source, relation, pipeline, sink and small fixed
//! enums. Never a key, an error message or anything per row.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Metric names, so tests and docs refer to the same strings.
pub mod names {
    #![allow(missing_docs)]
    pub const BUILD_INFO: &str = "polysync_build_info";
    pub const SOURCE_CHANGES: &str = "polysync_source_changes_total";
    pub const SOURCE_LAG: &str = "polysync_source_lag_seconds";
    pub const SOURCE_CONNECTED: &str = "polysync_source_connected";
    pub const SOURCE_RECONNECTS: &str = "polysync_source_reconnects_total";
    pub const PG_SLOT_LAG: &str = "polysync_pg_slot_lag_bytes";
    pub const PG_SLOT_LAG_EXCEEDED: &str = "polysync_pg_slot_lag_limit_exceeded";
    pub const PG_CONFIRMED_LSN: &str = "polysync_pg_confirmed_flush_lsn";
    pub const PG_SLOT_LOST: &str = "polysync_pg_slot_lost_total";
    pub const PG_SCHEMA_CHANGES: &str = "polysync_pg_schema_changes_total";
    pub const UNMATCHED_CHANGES: &str = "polysync_unmatched_changes_total";
    pub const PG_TIMELINE_CHANGES: &str = "polysync_pg_timeline_changes_total";
    pub const PG_FAILOVER_GAPS: &str = "polysync_pg_failover_gaps";
    pub const DDB_SHARDS_OWNED: &str = "polysync_ddb_shards_owned";
    pub const DDB_LEASE_TAKES: &str = "polysync_ddb_lease_takes_total";
    pub const DDB_TRIMMED: &str = "polysync_ddb_trimmed_data_total";
    pub const DDB_ITERATORS_EXPIRED: &str = "polysync_ddb_iterators_expired_total";
    pub const DDB_FOREIGN_WRITES: &str = "polysync_ddb_foreign_writes_skipped_total";
    pub const DDB_THROTTLES: &str = "polysync_ddb_throttles_total";
    pub const TS_POINT_COLLISIONS: &str = "polysync_timeseries_point_collisions_total";
    pub const SNAPSHOT_ROWS: &str = "polysync_snapshot_rows_total";
    pub const SNAPSHOT_CHUNKS_REMAINING: &str = "polysync_snapshot_chunks_remaining";
    pub const IN_FLIGHT: &str = "polysync_in_flight_changes";
    pub const PIPELINE_OUTPUTS: &str = "polysync_pipeline_outputs_total";
    pub const PIPELINE_SKIPPED: &str = "polysync_pipeline_skipped_total";
    pub const SINK_RECORDS: &str = "polysync_sink_records_total";
    pub const SINK_REQUEST_DURATION: &str = "polysync_sink_request_duration_seconds";
    pub const SINK_BATCH_SIZE: &str = "polysync_sink_batch_records";
    pub const SINK_RETRIES: &str = "polysync_sink_retries_total";
    pub const SINK_ERRORS: &str = "polysync_sink_errors_total";
    pub const SINK_UP: &str = "polysync_sink_up";
    pub const INCOMPLETE_ROWS: &str = "polysync_incomplete_rows_total";
    pub const SINK_BACKLOG: &str = "polysync_sink_backlog_records";
    pub const SINK_LAG: &str = "polysync_sink_lag_seconds";
    pub const SINK_SPOOL_BYTES: &str = "polysync_sink_spool_bytes";
    pub const SINK_SPILLS: &str = "polysync_sink_spills_total";
    pub const SINK_SPOOLED: &str = "polysync_sink_spooled_records_total";
    pub const SINK_FENCED: &str = "polysync_sink_fenced_records_total";
    pub const END_TO_END_LAG: &str = "polysync_end_to_end_lag_seconds";
    pub const DLQ_ENTRIES: &str = "polysync_dlq_entries_total";
    pub const DLQ_BYTES: &str = "polysync_dlq_bytes";
    pub const DLQ_WRITE_FAILURES: &str = "polysync_dlq_write_failures_total";
    pub const DLQ_MIRROR_DROPPED: &str = "polysync_dlq_mirror_dropped_total";
    pub const CONFIG_RELOADS: &str = "polysync_config_reloads_total";

    /// Every name above (dashboards and docs are checked against it).
    pub const ALL: &[&str] = &[
        BUILD_INFO,
        SOURCE_CHANGES,
        SOURCE_LAG,
        SOURCE_CONNECTED,
        SOURCE_RECONNECTS,
        PG_SLOT_LAG,
        PG_CONFIRMED_LSN,
        DDB_SHARDS_OWNED,
        DDB_LEASE_TAKES,
        DDB_TRIMMED,
        DDB_ITERATORS_EXPIRED,
        DDB_FOREIGN_WRITES,
        DDB_THROTTLES,
        TS_POINT_COLLISIONS,
        SNAPSHOT_ROWS,
        PG_SLOT_LAG_EXCEEDED,
        PG_SLOT_LOST,
        PG_TIMELINE_CHANGES,
        PG_FAILOVER_GAPS,
        SNAPSHOT_CHUNKS_REMAINING,
        IN_FLIGHT,
        PIPELINE_OUTPUTS,
        PIPELINE_SKIPPED,
        SINK_RECORDS,
        SINK_REQUEST_DURATION,
        SINK_BATCH_SIZE,
        SINK_RETRIES,
        SINK_ERRORS,
        SINK_UP,
        INCOMPLETE_ROWS,
        SINK_BACKLOG,
        SINK_LAG,
        SINK_SPOOL_BYTES,
        SINK_SPILLS,
        SINK_SPOOLED,
        SINK_FENCED,
        END_TO_END_LAG,
        DLQ_ENTRIES,
        DLQ_BYTES,
        DLQ_WRITE_FAILURES,
        DLQ_MIRROR_DROPPED,
        CONFIG_RELOADS,
    ];
}

/// The registry and every family.
pub struct Metrics {
    /// Registry served on `/metrics`.
    pub registry: Registry,
    /// Build information (value 1, version label).
    pub build_info: IntGaugeVec,
    /// Changes read, by source and relation.
    pub source_changes: IntCounterVec,
    /// Seconds between now and the commit time of the last change seen, by source.
    pub source_lag: prometheus::GaugeVec,
    /// 1 while the source's stream is connected.
    pub source_connected: IntGaugeVec,
    /// Reconnects after a dropped stream.
    pub source_reconnects: IntCounterVec,
    /// Server WAL position minus the slot's confirmed_flush_lsn.
    pub pg_slot_lag: IntGaugeVec,
    /// 1 while the slot's lag is above `slot_lag_limit`.
    pub pg_slot_lag_exceeded: IntGaugeVec,
    /// Starts that found the slot lost (by reason): a gap the policy had to handle.
    pub pg_slot_lost: IntCounterVec,
    /// Column changes seen mid-stream, by kind (`added`, `dropped`, `renamed`, `retyped`).
    pub pg_schema_changes: IntCounterVec,
    /// Changes of a relation no pipeline reads (published, but never applied anywhere).
    pub unmatched_changes: IntCounterVec,
    /// Failovers to a promoted standby (a new timeline with the slot synchronised), at start
    /// or on a reconnect.
    pub pg_timeline_changes: IntCounterVec,
    /// Settings missing for the slot to survive a failover, as read at start (0 = ready).
    pub pg_failover_gaps: IntGaugeVec,
    /// Last LSN polysync confirmed to the server.
    pub pg_confirmed_lsn: IntGaugeVec,
    /// Changes read but not yet applied by every sink.
    pub in_flight: IntGaugeVec,
    /// DynamoDB shards this instance reads.
    pub ddb_shards_owned: IntGaugeVec,
    /// Leases this instance took (from nobody, an expired owner, or by balancing).
    pub ddb_lease_takes: IntCounterVec,
    /// TrimmedDataAccessException: records expired from the stream before they were read.
    pub ddb_trimmed: IntCounterVec,
    /// Shard iterators that expired and were re-acquired.
    pub ddb_iterators_expired: IntCounterVec,
    /// Stream records of another region's writes passed over (`only_writes_from`).
    pub ddb_foreign_writes: IntCounterVec,
    /// Throttled stream or table calls.
    pub ddb_throttles: IntCounterVec,
    /// Points of one write that share measurement, tags and time (the store keeps only one).
    pub ts_point_collisions: IntCounterVec,
    /// Rows emitted by snapshots and backfills, by source and relation.
    pub snapshot_rows: IntCounterVec,
    /// Estimated chunks a running snapshot still has to read (from the table's row estimate).
    pub snapshot_chunks_remaining: IntGaugeVec,
    /// Sink records produced, by pipeline and sink.
    pub pipeline_outputs: IntCounterVec,
    /// Changes a pipeline's filter or transform skipped, by reason (`filtered`, `aborted`).
    pub pipeline_skipped: IntCounterVec,
    /// Records finished by a sink, by result (`applied`, `dead_lettered`).
    pub sink_records: IntCounterVec,
    /// Duration of one sink request (a batch).
    pub sink_request_duration: HistogramVec,
    /// Records per sink request.
    pub sink_batch_size: HistogramVec,
    /// Retries, by sink and kind (`request`, `item`).
    pub sink_retries: IntCounterVec,
    /// Errors, by sink and kind (`transient`, `rejected`, `dlq`).
    pub sink_errors: IntCounterVec,
    /// 1 when the sink answered its last request or health check.
    pub sink_up: IntGaugeVec,
    /// Rows written without some columns because the source did not send them (unchanged TOAST
    /// values) and the sink held no stored copy to keep them from, by sink.
    pub incomplete_rows: IntCounterVec,
    /// Records a sink has not applied yet (in memory and in its spool), by sink.
    pub sink_backlog: IntGaugeVec,
    /// Seconds from the source commit of a sink's oldest unapplied record to now, by sink.
    pub sink_lag: prometheus::GaugeVec,
    /// Bytes in a sink's spool, by sink.
    pub sink_spool_bytes: IntGaugeVec,
    /// Times a sink fell behind and its records went to its spool, by sink.
    pub sink_spills: IntCounterVec,
    /// Records written to a sink's spool, by sink.
    pub sink_spooled: IntCounterVec,
    /// Records a sink abandoned unapplied because the DynamoDB lease they were read under was
    /// no longer valid (the shard's next owner reads them again), by sink.
    pub sink_fenced: IntCounterVec,
    /// Source commit → sink acknowledgement, by pipeline.
    pub end_to_end_lag: HistogramVec,
    /// DLQ entries written, by pipeline and sink.
    pub dlq_entries: IntCounterVec,
    /// Bytes held in DLQ files.
    pub dlq_bytes: IntGauge,
    /// DLQ writes that failed (the change was not acknowledged).
    pub dlq_write_failures: IntCounter,
    /// Entries the Redis-stream mirror could not take (the files still hold them).
    pub dlq_mirror_dropped: IntCounter,
    /// Config reloads by result (`ok`, `error`).
    pub config_reloads: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    fn new() -> Metrics {
        use names::*;
        let r = Registry::new();
        let latency =
            vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
        let source_lag = prometheus::GaugeVec::new(
            Opts::new(SOURCE_LAG, "Seconds between now and the commit time of the newest change read"),
            &["source"],
        )
        .expect("valid metric");
        r.register(Box::new(source_lag.clone())).expect("unique metric");
        let sink_lag = prometheus::GaugeVec::new(
            Opts::new(SINK_LAG, "Seconds from the source commit of the oldest record a sink has not applied to now"),
            &["sink"],
        )
        .expect("valid metric");
        r.register(Box::new(sink_lag.clone())).expect("unique metric");
        let dlq_bytes = IntGauge::new(DLQ_BYTES, "Bytes held in dead-letter files").expect("valid metric");
        r.register(Box::new(dlq_bytes.clone())).expect("unique metric");
        let dlq_write_failures =
            IntCounter::new(DLQ_WRITE_FAILURES, "Dead-letter writes that failed; the change was not acknowledged")
                .expect("valid metric");
        r.register(Box::new(dlq_write_failures.clone())).expect("unique metric");
        let dlq_mirror_dropped = IntCounter::new(
            DLQ_MIRROR_DROPPED,
            "Dead letters not copied to the Redis stream mirror (the DLQ files still hold them)",
        )
        .expect("valid metric");
        r.register(Box::new(dlq_mirror_dropped.clone())).expect("unique metric");
        let m = Metrics {
            dlq_mirror_dropped,
            build_info: gauge(&r, BUILD_INFO, "Build information", &["version"]),
            source_changes: counter(&r, SOURCE_CHANGES, "Changes read from a source", &["source", "relation"]),
            source_lag,
            source_connected: gauge(&r, SOURCE_CONNECTED, "1 while the source stream is connected", &["source"]),
            source_reconnects: counter(&r, SOURCE_RECONNECTS, "Source stream reconnects", &["source"]),
            pg_slot_lag: gauge(
                &r,
                PG_SLOT_LAG,
                "Server WAL position minus the slot's confirmed_flush_lsn",
                &["source", "slot"],
            ),
            pg_confirmed_lsn: gauge(&r, PG_CONFIRMED_LSN, "Last LSN confirmed to the server as applied", &["source"]),
            ddb_shards_owned: gauge(&r, DDB_SHARDS_OWNED, "DynamoDB shards this instance reads", &["source"]),
            ddb_lease_takes: counter(&r, DDB_LEASE_TAKES, "Shard leases taken by this instance", &["source"]),
            ddb_trimmed: counter(
                &r,
                DDB_TRIMMED,
                "Times a shard's records expired from the stream before they were read (data lost upstream)",
                &["source"],
            ),
            ddb_iterators_expired: counter(
                &r,
                DDB_ITERATORS_EXPIRED,
                "Shard iterators re-acquired after expiring",
                &["source"],
            ),
            ddb_foreign_writes: counter(
                &r,
                DDB_FOREIGN_WRITES,
                "Stream records of writes made in another region, passed over (only_writes_from, global tables)",
                &["source"],
            ),
            ddb_throttles: counter(&r, DDB_THROTTLES, "Throttled DynamoDB Streams calls", &["source"]),
            ts_point_collisions: counter(
                &r,
                TS_POINT_COLLISIONS,
                "Time-series points of one write with the same measurement, tags and time: the store keeps one of them",
                &["sink"],
            ),
            pg_slot_lag_exceeded: gauge(
                &r,
                PG_SLOT_LAG_EXCEEDED,
                "1 while the replication slot's lag is above slot_lag_limit",
                &["source", "slot"],
            ),
            unmatched_changes: counter(
                &r,
                UNMATCHED_CHANGES,
                "Changes of a relation that no pipeline reads: published by the source, applied nowhere",
                &["source", "relation"],
            ),
            pg_schema_changes: counter(
                &r,
                PG_SCHEMA_CHANGES,
                "Column changes of a published table seen mid-stream (the copies of rows written before it need a re-read; on_column_change decides)",
                &["source", "relation", "change"],
            ),
            pg_slot_lost: counter(
                &r,
                PG_SLOT_LOST,
                "Starts that found the replication slot lost (missing, invalidated, advanced by another consumer, renamed, or another system)",
                &["source", "reason"],
            ),
            pg_timeline_changes: counter(
                &r,
                PG_TIMELINE_CHANGES,
                "Failovers to a promoted standby: a start or reconnect on a new server timeline with the slot synchronised",
                &["source"],
            ),
            pg_failover_gaps: gauge(
                &r,
                PG_FAILOVER_GAPS,
                "Settings missing for the replication slot to survive a failover (failover slot, synchronized_standby_slots, the standbys' sync_replication_slots...), read at start; 0 = ready",
                &["source"],
            ),
            snapshot_rows: counter(
                &r,
                SNAPSHOT_ROWS,
                "Rows emitted by snapshots and backfills",
                &["source", "relation"],
            ),
            snapshot_chunks_remaining: gauge(
                &r,
                SNAPSHOT_CHUNKS_REMAINING,
                "Estimated chunks a running snapshot still has to read",
                &["source", "relation"],
            ),
            in_flight: gauge(&r, IN_FLIGHT, "Changes read but not yet applied by every sink", &["source"]),
            pipeline_outputs: counter(
                &r,
                PIPELINE_OUTPUTS,
                "Sink records produced by a pipeline",
                &["pipeline", "sink"],
            ),
            pipeline_skipped: counter(
                &r,
                PIPELINE_SKIPPED,
                "Changes skipped by a pipeline's filter or an abort in its transform",
                &["pipeline", "reason"],
            ),
            sink_records: counter(&r, SINK_RECORDS, "Records finished by a sink", &["sink", "result"]),
            sink_request_duration: histogram(
                &r,
                SINK_REQUEST_DURATION,
                "Duration of one sink request (a batch)",
                &["sink"],
                latency.clone(),
            ),
            sink_batch_size: histogram(
                &r,
                SINK_BATCH_SIZE,
                "Records per sink request",
                &["sink"],
                vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0],
            ),
            sink_retries: counter(&r, SINK_RETRIES, "Sink retries", &["sink", "kind"]),
            sink_errors: counter(&r, SINK_ERRORS, "Sink errors", &["sink", "kind"]),
            sink_up: gauge(&r, SINK_UP, "1 when the sink answered its last request or check", &["sink"]),
            sink_backlog: gauge(&r, SINK_BACKLOG, "Records a sink has not applied yet (memory and spool)", &["sink"]),
            sink_lag,
            sink_spool_bytes: gauge(&r, SINK_SPOOL_BYTES, "Bytes in a sink's spool", &["sink"]),
            sink_spills: counter(
                &r,
                SINK_SPILLS,
                "Times a sink fell behind and its records went to its spool",
                &["sink"],
            ),
            sink_spooled: counter(&r, SINK_SPOOLED, "Records written to a sink's spool", &["sink"]),
            sink_fenced: counter(
                &r,
                SINK_FENCED,
                "Records abandoned unapplied because the lease they were read under lapsed",
                &["sink"],
            ),
            incomplete_rows: counter(
                &r,
                INCOMPLETE_ROWS,
                "Rows written without columns the source did not send (unchanged TOAST values) and the sink had no stored copy of",
                &["sink"],
            ),
            end_to_end_lag: histogram(
                &r,
                END_TO_END_LAG,
                "Source commit to sink acknowledgement",
                &["pipeline"],
                latency,
            ),
            dlq_entries: counter(&r, DLQ_ENTRIES, "Dead-letter entries written", &["pipeline", "sink"]),
            dlq_bytes,
            dlq_write_failures,
            config_reloads: counter(&r, CONFIG_RELOADS, "Pipeline/config reloads by result", &["result"]),
            registry: r,
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// End-to-end lag histogram for a pipeline.
    pub fn lag_for(&self, pipeline: &str) -> Histogram {
        self.end_to_end_lag.with_label_values(&[pipeline])
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}
