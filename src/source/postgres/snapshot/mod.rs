//! Snapshots and backfills while the stream flows: chunks read by primary key between two
//! watermarks written into the WAL (the DBLog method), so rows and live changes interleave
//! correctly without locks and without pausing the stream.
//!
//! For each chunk a worker:
//! 1. writes a *low* watermark (`pg_logical_emit_message(true, 'polysync.snapshot', 'low …')`);
//! 2. reads the next chunk (`WHERE (pk) > (last) ORDER BY pk LIMIT n`) and hands it to the
//!    [`Coordinator`];
//! 3. writes a *high* watermark and waits until the slot's confirmed position passes it.
//!
//! The stream, reading in WAL order, records the keys of every change to the table between the
//! low and the high watermark (those rows may be older in the chunk than in the stream) and, at
//! the high watermark, emits the chunk's other rows as `read` changes versioned with the high
//! watermark's commit LSN, at that point of the stream: a later change to the row is newer, an
//! earlier one was visible to the chunk's read. The worker records the chunk's last key only
//! once the slot confirms past the high watermark, i.e. when every sink applied the rows; a
//! crash resumes at that key. Memory is one chunk per running table, plus the keys changed
//! during a window (capped: a window that sees more is read again).
//!
//! The parts: [`coordinator`] (the stream's side: windows, chunks, what a watermark
//! releases), [`manager`] (which tasks run: initial snapshots, signals, re-reads after a
//! column change), [`chunk_reader`] (one task read chunk by chunk between watermarks) and
//! [`table_shape`] (columns and keys as the chunk query needs them). Progress is recorded by
//! [`crate::checkpoint::snapshot::ProgressStore`].

mod chunk_reader;
mod coordinator;
mod manager;
mod table_shape;

pub use coordinator::{Coordinator, ReadRow, Released, Reread};
pub use manager::Manager;

/// Logical-message prefix of the watermarks.
pub const PREFIX: &str = "polysync.snapshot";

/// A snapshot request read from the signal table.
#[derive(Debug, Clone)]
pub struct Signal {
    /// Signal row id.
    pub id: i64,
    /// Pipeline to feed.
    pub pipeline: String,
    /// One table, or every table of the pipeline.
    pub relation: Option<String>,
    /// Extra SQL condition.
    pub filter: Option<String>,
}
