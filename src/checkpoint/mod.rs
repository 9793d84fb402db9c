//! What sources persist about their progress besides the slot itself: DynamoDB shard
//! positions ([`store::ShardStore`]: an embedded file for one instance, a lease table for
//! several) and snapshot progress.

pub mod lease;
pub mod snapshot;
pub mod store;
