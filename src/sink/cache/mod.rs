//! The `cache` sink: ElastiCache (Valkey / Redis OSS) over RESP with `fred`.

pub mod action;
pub mod config;
mod sink;

pub use action::CacheOp;
pub use config::CacheSinkConfig;
pub use sink::{CacheSink, GUARDED_WRITE, redis_slot};
