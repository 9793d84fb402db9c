//! The `graph` sink: Amazon Neptune / Gremlin Server over Gremlin bytecode, idempotent upserts
//! (`mergeV`/`mergeE`, or `coalesce` for older engines) with deterministic ids.

pub mod action;
pub mod config;
pub mod gremlin;
pub mod iam;
mod sink;

pub use action::GraphOp;
pub use config::GraphSinkConfig;
pub use sink::{GraphSink, Request, plan};
