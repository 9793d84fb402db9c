//! Is the slot still the one polysync streamed from? At start the saved
//! [`OriginRecord`] is compared with what the server says (`IDENTIFY_SYSTEM` and the slot's
//! row); a gap the sinks would never hear about is named and handed to `on_slot_lost`.

use std::fmt;
use std::path::{Path, PathBuf};

use chrono::Utc;
use tokio_postgres::Client;

use super::config::{ConnInfo, OnSlotLost, PostgresSourceConfig};
use super::replication::ReplConnection;
use super::setup;
use crate::change::Lsn;
use crate::checkpoint::origin::{OriginRecord, origin_path};
use crate::source::SourceError;
use crate::telemetry::metrics;

/// What the server says about where the source would stream from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    /// `IDENTIFY_SYSTEM` system identifier.
    pub system_identifier: String,
    /// Current timeline.
    pub timeline: u32,
    /// The slot, if it exists.
    pub slot: Option<SlotFacts>,
}

/// The slot's row in `pg_replication_slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotFacts {
    /// `confirmed_flush_lsn`.
    pub confirmed_flush: u64,
    /// `wal_status = 'lost'` (or an `invalidation_reason` on 17+): the server removed WAL the
    /// slot still needed, so it cannot stream any more.
    pub invalidated: Option<String>,
}

/// Why the changes since polysync's last confirmed position cannot reach the sinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// The slot polysync streamed from does not exist (dropped, a failover to a server without
    /// it, a restore).
    SlotMissing {
        /// Slot.
        slot: String,
        /// polysync's last confirmed position.
        confirmed: u64,
    },
    /// polysync dropped it itself at the lag limit.
    DroppedByPolysync {
        /// Slot.
        slot: String,
        /// Why.
        reason: String,
    },
    /// The server invalidated the slot (`max_slot_wal_keep_size`, or a conflict on a standby).
    SlotInvalidated {
        /// Slot.
        slot: String,
        /// Why, as the server says.
        reason: String,
    },
    /// The slot was confirmed past what polysync confirmed: another consumer, or
    /// `pg_replication_slot_advance`, skipped changes.
    SlotAhead {
        /// Slot.
        slot: String,
        /// The slot's `confirmed_flush_lsn`.
        slot_lsn: u64,
        /// polysync's last confirmed position.
        ours: u64,
    },
    /// The config names another slot than the one polysync streamed from.
    SlotRenamed {
        /// The slot polysync streamed from.
        before: String,
        /// The slot the config names.
        now: String,
    },
    /// Another database system (a restore into a new cluster, a clone, blue/green): its
    /// positions and versions are not comparable with the old one's.
    OtherSystem {
        /// The system identifier polysync streamed from.
        before: String,
        /// The server's.
        now: String,
    },
}

impl Lost {
    /// Short label for the metric.
    pub fn label(&self) -> &'static str {
        match self {
            Lost::SlotMissing { .. } => "slot_missing",
            Lost::DroppedByPolysync { .. } => "dropped_at_lag_limit",
            Lost::SlotInvalidated { .. } => "slot_invalidated",
            Lost::SlotAhead { .. } => "slot_ahead",
            Lost::SlotRenamed { .. } => "slot_renamed",
            Lost::OtherSystem { .. } => "other_system",
        }
    }
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lost::SlotMissing { slot, confirmed } => write!(
                f,
                "replication slot {slot:?} no longer exists, but polysync streamed from it up to {}: changes since then were never delivered",
                Lsn(*confirmed)
            ),
            Lost::DroppedByPolysync { slot, reason } => {
                write!(
                    f,
                    "replication slot {slot:?} was dropped by polysync ({reason}): changes since then were never delivered"
                )
            }
            Lost::SlotInvalidated { slot, reason } => write!(
                f,
                "replication slot {slot:?} was invalidated by the server ({reason}): it cannot stream the changes since its position"
            ),
            Lost::SlotAhead { slot, slot_lsn, ours } => write!(
                f,
                "replication slot {slot:?} is confirmed up to {} but polysync confirmed only {}: something else consumed or advanced it, and the changes in between were never delivered",
                Lsn(*slot_lsn),
                Lsn(*ours)
            ),
            Lost::SlotRenamed { before, now } => write!(
                f,
                "the config names slot {now:?} but polysync streamed from slot {before:?}: a new slot starts now, and changes since the last run would be skipped"
            ),
            Lost::OtherSystem { before, now } => write!(
                f,
                "the database is another system (system identifier {now}, polysync streamed from {before}: a restore, a clone or a blue/green switchover)"
            ),
        }
    }
}

/// The comparison's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No record: the first start with this `state_dir`.
    First,
    /// The slot is the one polysync streamed from.
    Same,
    /// A new timeline with the slot in place and not ahead: a promoted standby that had the
    /// slot synchronised (a failover slot). Streaming resumes from it.
    Promoted {
        /// The recorded timeline.
        from: u32,
        /// The server's.
        to: u32,
    },
    /// A gap.
    Lost(Lost),
}

/// Compare the saved record with the server's facts.
pub fn judge(record: Option<&OriginRecord>, facts: &ServerFacts, slot: &str) -> Verdict {
    let Some(r) = record else { return Verdict::First };
    if r.system_identifier != facts.system_identifier {
        return Verdict::Lost(Lost::OtherSystem {
            before: r.system_identifier.clone(),
            now: facts.system_identifier.clone(),
        });
    }
    if r.slot != slot {
        return Verdict::Lost(Lost::SlotRenamed { before: r.slot.clone(), now: slot.to_string() });
    }
    let Some(s) = &facts.slot else {
        return Verdict::Lost(match &r.dropped {
            Some(reason) => Lost::DroppedByPolysync { slot: slot.to_string(), reason: reason.clone() },
            None => Lost::SlotMissing { slot: slot.to_string(), confirmed: r.confirmed_lsn },
        });
    };
    if let Some(reason) = &s.invalidated {
        return Verdict::Lost(Lost::SlotInvalidated { slot: slot.to_string(), reason: reason.clone() });
    }
    if s.confirmed_flush > r.confirmed_lsn {
        return Verdict::Lost(Lost::SlotAhead {
            slot: slot.to_string(),
            slot_lsn: s.confirmed_flush,
            ours: r.confirmed_lsn,
        });
    }
    if facts.timeline != r.timeline {
        return Verdict::Promoted { from: r.timeline, to: facts.timeline };
    }
    Verdict::Same
}

/// Read the server's facts: `IDENTIFY_SYSTEM` on a replication connection, the slot's row on
/// the SQL one.
pub async fn server_facts(
    client: &Client,
    info: &ConnInfo,
    source: &str,
    slot: &str,
) -> Result<ServerFacts, SourceError> {
    let mut repl = ReplConnection::connect(info).await.map_err(|e| SourceError::Connect {
        source_name: source.to_string(),
        endpoint: info.endpoint(),
        msg: e.to_string(),
        transient: e.is_transient(),
    })?;
    let rows = repl.simple_query("IDENTIFY_SYSTEM").await;
    repl.close().await;
    let setup_err = |msg: String| SourceError::Setup { source_name: source.to_string(), msg };
    let rows = rows.map_err(|e| setup_err(format!("IDENTIFY_SYSTEM: {e}")))?;
    let row = rows.first().ok_or_else(|| setup_err("IDENTIFY_SYSTEM returned no row".into()))?;
    let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let system_identifier = field(0);
    let timeline = field(1).parse().map_err(|_| setup_err(format!("IDENTIFY_SYSTEM: timeline {:?}", field(1))))?;
    let slot_row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, CASE WHEN wal_status = 'lost' THEN 'the WAL it needs was removed (max_slot_wal_keep_size)' END \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| setup_err(setup::pg_error_text(&e)))?;
    let slot = slot_row.map(|r| SlotFacts {
        confirmed_flush: r.get::<_, Option<String>>(0).and_then(|t| t.parse::<Lsn>().ok()).map(|l| l.0).unwrap_or(0),
        invalidated: r.get(1),
    });
    Ok(ServerFacts { system_identifier, timeline, slot })
}

/// What a reconnect found, compared with the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The server polysync streamed from, or one that continues its history on its timeline.
    Same,
    /// A promoted standby of the same system (a failover or switchover).
    NewTimeline {
        /// The recorded timeline.
        from: u32,
        /// The server's.
        to: u32,
    },
}

/// What the start of a source does after the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Stream on.
    Stream,
    /// `on_slot_lost = "resnapshot"`: stream from a new (or the present) slot and re-read
    /// every table of every pipeline, clearing them in the sinks first.
    Resnapshot(Lost),
}

/// Check the source against its record and apply `on_slot_lost`. An error is a refusal to
/// start that names what happened and what to do.
pub async fn check(
    client: &Client,
    info: &ConnInfo,
    source: &str,
    cfg: &PostgresSourceConfig,
    state_dir: &Path,
) -> Result<Start, SourceError> {
    let path = origin_path(state_dir, source);
    let setup_err = |msg: String| SourceError::Setup { source_name: source.to_string(), msg };
    let record = OriginRecord::load(&path).map_err(|e| setup_err(e.to_string()))?;
    let facts = server_facts(client, info, source, &cfg.slot).await?;
    match judge(record.as_ref(), &facts, &cfg.slot) {
        Verdict::First | Verdict::Same => Ok(Start::Stream),
        Verdict::Promoted { from, to } => {
            metrics().pg_timeline_changes.with_label_values(&[source]).inc();
            tracing::warn!(source, slot = %cfg.slot, from_timeline = from, to_timeline = to, "the server is on a new timeline (a promoted standby) and the slot was synchronised to it; resuming from the slot");
            Ok(Start::Stream)
        }
        Verdict::Lost(lost) => {
            metrics().pg_slot_lost.with_label_values(&[source, lost.label()]).inc();
            match (cfg.on_slot_lost, &lost) {
                (OnSlotLost::Resnapshot, Lost::OtherSystem { .. }) | (OnSlotLost::Stop, _) => {
                    let what = match &lost {
                        Lost::OtherSystem { .. } => format!(
                            "{lost}. Its positions and versions are not comparable with the old system's, so the sinks cannot be repaired in place: clear what polysync wrote for this source, then delete {} and start again",
                            path.display()
                        ),
                        _ => format!(
                            "{lost}. on_slot_lost = \"stop\": set on_slot_lost = \"resnapshot\" to re-read every table of every pipeline from a new slot, or delete {} to accept the gap",
                            path.display()
                        ),
                    };
                    tracing::error!(source, slot = %cfg.slot, reason = lost.label(), "{what}");
                    Err(setup_err(what))
                }
                (OnSlotLost::Resnapshot, _) => {
                    tracing::error!(source, slot = %cfg.slot, reason = lost.label(), "{lost}; on_slot_lost = \"resnapshot\": streaming from a new slot and re-reading every table of every pipeline");
                    Ok(Start::Resnapshot(lost))
                }
            }
        }
    }
}

/// Keeps the record in step with the stream: written once streaming can start, and before each
/// higher position is confirmed to the server.
pub struct Recorder {
    path: PathBuf,
    record: std::sync::Mutex<OriginRecord>,
    /// The last write failed (said once, not at every status update).
    failing: std::sync::atomic::AtomicBool,
}

impl Recorder {
    /// Record the present facts (after the slot exists) and return the recorder.
    pub async fn begin(
        client: &Client,
        info: &ConnInfo,
        source: &str,
        slot: &str,
        state_dir: &Path,
    ) -> Result<Recorder, SourceError> {
        let facts = server_facts(client, info, source, slot).await?;
        let path = origin_path(state_dir, source);
        let previous = OriginRecord::load(&path).ok().flatten();
        let confirmed = facts.slot.as_ref().map(|s| s.confirmed_flush).unwrap_or(0);
        let record = OriginRecord {
            system_identifier: facts.system_identifier,
            timeline: facts.timeline,
            database: info.dbname.clone(),
            slot: slot.to_string(),
            // Never below what the slot says: the slot may lag a record written before a crash.
            confirmed_lsn: confirmed.max(previous.filter(|p| p.slot == slot).map(|p| p.confirmed_lsn).unwrap_or(0)),
            dropped: None,
            updated: Utc::now(),
        };
        let recorder = Recorder {
            path,
            record: std::sync::Mutex::new(record.clone()),
            failing: std::sync::atomic::AtomicBool::new(false),
        };
        // A full state disk does not stop the start: the record on disk is at least the slot's
        // position already, and no position past what is written is ever confirmed.
        if let Err(e) = recorder.save(record).await {
            recorder.failing.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(source, error = %e, "cannot write the source's state record; confirmations wait until it can be written");
        }
        Ok(recorder)
    }

    /// Compare the server a reconnect reached (its `IDENTIFY_SYSTEM`) with the record: the
    /// same system on a new timeline is a failover to a promoted standby, recorded here; another
    /// system means the positions are not comparable, and the stream must not go on.
    pub async fn observe(&self, system_identifier: &str, timeline: u32) -> Result<Observed, Lost> {
        let (before, next) = {
            let r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            if r.system_identifier != system_identifier {
                return Err(Lost::OtherSystem {
                    before: r.system_identifier.clone(),
                    now: system_identifier.to_string(),
                });
            }
            if r.timeline == timeline {
                return Ok(Observed::Same);
            }
            (r.timeline, OriginRecord { timeline, updated: Utc::now(), ..r.clone() })
        };
        if let Err(e) = self.save(next).await {
            // The next start compares timelines again and says the same: nothing is lost.
            tracing::warn!(path = %self.path.display(), error = %e, "cannot record the new timeline");
        }
        Ok(Observed::NewTimeline { from: before, to: timeline })
    }

    /// The position recorded last.
    pub fn recorded(&self) -> u64 {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).confirmed_lsn
    }

    /// Record `lsn` before it is confirmed; an error means it must not be confirmed yet (the
    /// recorded position stays what it was).
    pub async fn confirm(&self, lsn: u64) -> Result<(), String> {
        let next = {
            let r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            if lsn <= r.confirmed_lsn {
                return Ok(());
            }
            OriginRecord { confirmed_lsn: lsn, updated: Utc::now(), ..r.clone() }
        };
        self.save(next).await
    }

    /// Say that polysync dropped the slot itself, so the next start does not mistake the
    /// missing slot for a first start.
    pub async fn dropped(&self, reason: &str) -> Result<(), String> {
        let next = OriginRecord {
            dropped: Some(reason.to_string()),
            ..self.record.lock().unwrap_or_else(|p| p.into_inner()).clone()
        };
        self.save(next).await
    }

    /// Write `next` to disk, then make it the recorded state.
    async fn save(&self, next: OriginRecord) -> Result<(), String> {
        let (on_disk, path) = (next.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || on_disk.save(&path).map_err(|e| e.to_string()))
            .await
            .map_err(|e| e.to_string())??;
        *self.record.lock().unwrap_or_else(|p| p.into_inner()) = next;
        if self.failing.swap(false, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!(path = %self.path.display(), "the source's state record is written again");
        }
        Ok(())
    }

    /// True the first time a write fails after one succeeded (so callers say it once).
    pub fn newly_failing(&self) -> bool {
        !self.failing.swap(true, std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(lsn: u64) -> OriginRecord {
        OriginRecord {
            system_identifier: "7300".into(),
            timeline: 1,
            database: "app".into(),
            slot: "s".into(),
            confirmed_lsn: lsn,
            dropped: None,
            updated: Utc::now(),
        }
    }

    fn facts(slot: Option<u64>) -> ServerFacts {
        ServerFacts {
            system_identifier: "7300".into(),
            timeline: 1,
            slot: slot.map(|l| SlotFacts { confirmed_flush: l, invalidated: None }),
        }
    }

    #[test]
    fn every_way_of_losing_the_slot_is_named_and_a_first_start_is_not_one() {
        assert_eq!(judge(None, &facts(None), "s"), Verdict::First);
        assert_eq!(judge(Some(&record(100)), &facts(Some(100)), "s"), Verdict::Same);
        // Behind the record is normal: a crash after recording, before confirming.
        assert_eq!(judge(Some(&record(100)), &facts(Some(90)), "s"), Verdict::Same);
        assert!(matches!(
            judge(Some(&record(100)), &facts(None), "s"),
            Verdict::Lost(Lost::SlotMissing { confirmed: 100, .. })
        ));
        assert!(matches!(judge(Some(&record(100)), &facts(Some(101)), "s"), Verdict::Lost(Lost::SlotAhead { .. })));
        assert!(matches!(judge(Some(&record(100)), &facts(Some(100)), "t"), Verdict::Lost(Lost::SlotRenamed { .. })));
        let mut other = facts(Some(100));
        other.system_identifier = "7999".into();
        assert!(matches!(judge(Some(&record(100)), &other, "s"), Verdict::Lost(Lost::OtherSystem { .. })));
        let mut dropped = record(100);
        dropped.dropped = Some("lag limit".into());
        assert!(matches!(judge(Some(&dropped), &facts(None), "s"), Verdict::Lost(Lost::DroppedByPolysync { .. })));
        let mut invalid = facts(Some(100));
        invalid.slot.as_mut().unwrap().invalidated = Some("wal removed".into());
        assert!(matches!(judge(Some(&record(100)), &invalid, "s"), Verdict::Lost(Lost::SlotInvalidated { .. })));
        let mut promoted = facts(Some(100));
        promoted.timeline = 2;
        assert_eq!(judge(Some(&record(100)), &promoted, "s"), Verdict::Promoted { from: 1, to: 2 });
    }
}
