//! Checkpoints: what has been applied everywhere, and therefore what a source may confirm.
//!
//! For PostgreSQL the checkpoint *is* the slot's `confirmed_flush_lsn`, advanced only through
//! [`AckWindow`] marks; nothing is stored locally.

mod window;

pub use window::{AckWindow, Ticket};
