//! The `search` sink: OpenSearch Service / Serverless `_bulk` index and delete, versioned with
//! `external_gte` so a replay can never roll a document back.

pub mod action;
pub mod config;
mod sink;

pub use action::SearchOp;
pub use config::SearchSinkConfig;
pub use sink::{SearchSink, aws_error_text, item_outcome};
