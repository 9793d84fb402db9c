//! Checkpoints: what has been applied everywhere, and therefore what a source may confirm.
//!
//! For PostgreSQL the checkpoint *is* the slot's `confirmed_flush_lsn`, advanced only through
//! [`AckWindow`] marks; nothing is stored locally. For DynamoDB Streams, shard positions go to a
//! [`store::ShardStore`]: an embedded file for one instance, a lease table for several.

pub mod lease;
pub mod snapshot;
pub mod store;
mod window;

pub use window::{AckWindow, Ticket};
