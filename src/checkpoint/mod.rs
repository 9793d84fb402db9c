//! What sources persist about their progress besides the slot itself: DynamoDB shard
//! positions ([`store::ShardStore`]: an embedded file for one instance, a lease table for
//! several), snapshot progress, and where each PostgreSQL source streams from ([`origin`]).

pub mod fence;
pub mod file;
pub mod lease;
pub mod origin;
pub mod snapshot;
pub mod store;
