//! Where a PostgreSQL source streams from, as polysync last saw it: the database system, its
//! timeline, the slot and the last position polysync confirmed to it.
//!
//! The slot alone cannot tell a first start from a lost slot: a missing slot looks the same in
//! both. This record can. It is written when a source starts streaming and *before* each new
//! position is confirmed to the server, so the slot's `confirmed_flush_lsn` is never ahead of
//! it unless something other than polysync moved the slot.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The saved facts of one source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginRecord {
    /// `IDENTIFY_SYSTEM`'s system identifier: changes with a restore into a new cluster, a
    /// clone, or a blue/green switchover.
    pub system_identifier: String,
    /// The server's timeline: a promotion of a standby starts a new one.
    pub timeline: u32,
    /// Database the slot decodes.
    pub database: String,
    /// Slot name.
    pub slot: String,
    /// The highest position polysync confirmed (or is about to confirm) to the slot.
    pub confirmed_lsn: u64,
    /// Set when polysync itself dropped the slot (the lag limit), with the reason: the next
    /// start treats the missing slot as lost, not as a first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<String>,
    /// Last write.
    pub updated: DateTime<Utc>,
}

/// The record could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("source state {path}: {msg}")]
pub struct OriginError {
    /// File.
    pub path: PathBuf,
    /// What went wrong.
    pub msg: String,
}

/// The record file of `source` under `state_dir`.
pub fn origin_path(state_dir: &Path, source: &str) -> PathBuf {
    state_dir.join(format!("origin-{source}.json"))
}

impl OriginRecord {
    /// Read the record; `None` when this source never streamed with this `state_dir`.
    pub fn load(path: &Path) -> Result<Option<OriginRecord>, OriginError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| OriginError { path: path.to_owned(), msg: format!("unreadable: {e}") }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(OriginError { path: path.to_owned(), msg: e.to_string() }),
        }
    }

    /// Replace the record atomically.
    pub fn save(&self, path: &Path) -> Result<(), OriginError> {
        let body =
            serde_json::to_vec_pretty(self).map_err(|e| OriginError { path: path.to_owned(), msg: e.to_string() })?;
        super::file::write_atomic(path, &body).map_err(|e| OriginError { path: path.to_owned(), msg: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_a_round_trip_and_a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = origin_path(dir.path(), "db");
        assert_eq!(OriginRecord::load(&path).unwrap(), None);
        let r = OriginRecord {
            system_identifier: "7301".into(),
            timeline: 2,
            database: "app".into(),
            slot: "polysync".into(),
            confirmed_lsn: 0x1_0000_0028,
            dropped: None,
            updated: Utc::now(),
        };
        r.save(&path).unwrap();
        assert_eq!(OriginRecord::load(&path).unwrap(), Some(r));
        std::fs::write(&path, b"{").unwrap();
        assert!(OriginRecord::load(&path).unwrap_err().to_string().contains("unreadable"));
    }
}
