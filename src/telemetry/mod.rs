//! Metrics, health endpoints and logging setup.

pub mod health;
pub mod http;
pub mod log;
pub mod metrics;
pub mod systemd;

pub use health::Health;
pub use log::{LogConfig, LogFormat, init_logging};
pub use metrics::{Metrics, metrics};
