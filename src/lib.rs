//! polysync: a change-data-capture sync daemon.
//!
//! It tails PostgreSQL/Aurora logical replication (and, as the project grows, DynamoDB
//! Streams), runs each change through configured pipelines and keeps derived stores (cache,
//! graph, time series, search) in step with the source of truth, confirming a source position
//! only after every sink has applied everything before it.
//!
//! Data flow, module by module: [`source`] → [`pipeline`] (router, lanes, templates) →
//! [`sink`] (batching, retries, DLQ) → [`checkpoint`] (acknowledgement window → confirmed
//! position). [`config`] loads and validates files; [`telemetry`] exports metrics and health.

#![warn(missing_docs)]

pub mod app;
pub mod aws;
pub mod change;
pub mod checkpoint;
pub mod config;
pub mod dlq;
pub mod pipeline;
pub mod retry;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod tls;
