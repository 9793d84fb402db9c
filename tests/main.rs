//! Integration tests against the real servers `make peers` starts (one binary, linked once).

mod support;

mod bad_input;
mod capture;
mod conformance;
mod crash;
mod dynamodb;
mod examples;
mod failover;
mod faults;
mod graph;
mod ops;
mod pg_cache;
mod pg_tls;
mod pipelines;
mod redis_tls;
mod schema_changes;
mod search;
mod snapshot;
mod timeseries;
